"""Worker pool: long-lived external worker processes speaking RoadRunner's wire protocol.

Each captured email goes, as one request, to a worker process borrowed from a pool: Goridge v3
frames (:mod:`mailpipe.workers.goridge`) over the worker's stdin/stdout (or a tcp/unix socket),
with RoadRunner's worker protocol on top (pid handshake, request = event JSON in the context and
the raw message in the body, response context ``CONTINUE`` or ``CLOSE``, error frame, stop
control frame). PHP workers written with spiral/roadrunner-worker run unchanged; Python workers
use :mod:`mailpipe.sdk`. See docs/protocols.md sections 1 and 2.
"""


class PoolError(Exception):
    """The pool cannot serve: no worker in time, or the worker command cannot start.

    Defined here, in the package's light `__init__`, rather than in `pool.py` (which re-exports
    it): the app catches it at start without importing the pool when no workers are configured.
    """
