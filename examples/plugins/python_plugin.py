#!/usr/bin/env python3
"""A mailpipe plugin in Python, run out of process (go-plugin's gRPC protocol).

Configure it in mailpipe as an external plugin whose command is this file run by a Python
that has mailpipe installed. It refuses recipients matching its config's reject_pattern (550 5.1.1),
tempfails the sender tempfail@... (451), adds `X-Python-Plugin: yes` to every message, and
as a selector picks the healthy downstream with the highest weight.
"""

from __future__ import annotations

import logging
import os
import re

from mailpipe.plugins.sdk import Modify, Reject, Tempfail, config, serve

log = logging.getLogger("python-example")
# From the plugin's `config` in mailpipe's configuration, else the environment.
PATTERN = config().get("reject_pattern") or os.environ.get("REJECT_PATTERN", r"^reject")
REJECT = re.compile(PATTERN, re.IGNORECASE)


class Policy:
    def on_mail_from(self, ctx):
        if ctx["args"]["sender"].lower().startswith("tempfail@"):
            return Tempfail("Try again later (python plugin)", 451, "4.7.1")
        return None

    def on_rcpt_to(self, ctx):
        recipient = ctx["args"]["recipient"]
        if REJECT.search(recipient):
            log.warning("recipient refused", extra={"recipient": recipient})
            return Reject("No such user (python plugin)", 550, "5.1.1")
        return None

    async def on_message_complete(self, ctx):
        return Modify(add_headers=[("X-Python-Plugin", "yes")])


class Heaviest:
    def select(self, downstreams, envelope, message_uuid, event):
        healthy = [d for d in downstreams if d["healthy"]] or downstreams
        return max(healthy, key=lambda d: d["weight"])["name"]


if __name__ == "__main__":
    serve(hooks=Policy(), selector=Heaviest())
