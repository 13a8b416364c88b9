"""Child processes (workers, plugins, on_init commands) die with mailpipe.

mailpipe stops its children in order when it shuts down, but a mailpipe killed outright
(SIGKILL, the OOM killer, a crash) runs no shutdown, and its children lead their own sessions
(so that a terminal's Ctrl-C reaches mailpipe alone): they would live on, holding ports, temp
files and broker connections. On Linux the kernel can signal a child when its parent dies
(prctl PR_SET_PDEATHSIG); elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# TERM, not KILL: a worker or plugin may still remove its sockets and temp files.
DEATH_SIGNAL = signal.SIGTERM


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc.prctl  # type: ignore[no-any-return]


# Looked up here, in the parent: the child between fork and exec must not import or load.
_PRCTL = _load_prctl()


def die_with_parent(then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A preexec_fn for create_subprocess_exec: run `then` (a user switch, which would clear
    the setting, so it comes first), then ask for DEATH_SIGNAL when this process dies. None
    where the platform cannot and there is nothing else to run."""
    if _PRCTL is None:
        return then
    prctl = _PRCTL
    parent = os.getpid()

    def in_child() -> None:
        if then is not None:
            then()
        prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return in_child
