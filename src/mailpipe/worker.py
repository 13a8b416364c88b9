"""The old name of the worker and consumer SDK, kept so existing imports keep working.

The SDK lives in :mod:`mailpipe.sdk`; `mailpipe.workers` is the pool that runs workers. This
module is the very same module object, so `import mailpipe.worker` and monkeypatching it
behave exactly as before.
"""

import sys

from mailpipe import sdk

sys.modules[__name__] = sdk
