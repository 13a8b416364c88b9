"""How admin commands find a running mailpipe: `serve` keeps a small state file in its data dir
(its pid and the addresses it actually bound), so `mailpipe stop` finds a server started with
`--http` or `MAILPIPE_HTTP__ADDR` as well as one on the configured address.

The file is written atomically once the server listens and removed at a clean exit; one left
behind by a killed server is stale, which its pid tells. Only the standard library here: the
admin commands read it at every call.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE_FILE = "mailpipe.json"


def state_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / STATE_FILE


def write_state(data_dir: str | Path, *, http_addr: str | None, smtp: dict[str, str]) -> None:
    """Record this process as the server of `data_dir` (replacing a stale record)."""
    path = state_path(data_dir)
    state = {
        "pid": os.getpid(),
        "http_addr": http_addr,  # host:port bound, None when the HTTP API is disabled
        "smtp": smtp,
        "started_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    temp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(temp, path)  # readers see the old file or the new one, never half of it


def remove_state(data_dir: str | Path) -> None:
    """Remove the record if it is this process's (another server may have taken the dir)."""
    path = state_path(data_dir)
    state = _load(path)
    if state is not None and state.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    """The running server's record, or None: no file, an unreadable one, or a stale one."""
    state = _load(state_path(data_dir))
    if state is None or not _running(state.get("pid")):
        return None
    return state


def _load(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _running(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
