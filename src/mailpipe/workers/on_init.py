"""RoadRunner's `server.on_init`: a command run once, to its end, before any worker starts
(migrations, cache warm-up). Its output goes to mailpipe's log."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex

from mailpipe.config import ServerConfig
from mailpipe.workers.process import WorkerStartError, run_as, split_command

log = logging.getLogger("mailpipe.workers")

OUTPUT_TAIL = 5  # lines of its output quoted in the error when it fails


class OnInitError(Exception):
    """server.on_init failed and `exit_on_error` is set: mailpipe does not start."""


async def run_on_init(server: ServerConfig) -> None:
    """Run server.on_init (if set) to its end. Raises OnInitError when it cannot start, runs
    past exec_timeout or exits non-zero, unless exit_on_error is off (then: an error line)."""
    init = server.on_init
    if init is None:
        return
    command = split_command(init.command)
    try:
        status, output = await _run(command, server, init.exec_timeout)
    except (WorkerStartError, OSError, TimeoutError) as exc:
        reason = _reason(exc, init.exec_timeout)
    else:
        for line in output:
            log.info("on_init: %s", line)
        if status == 0:
            log.info("on_init done", extra={"command": shlex.join(command)})
            return
        reason = f"exited with status {status}"
        if output:
            reason += ": " + " | ".join(output[-OUTPUT_TAIL:])
    message = f"server.on_init: {shlex.join(command)} {reason}"
    if init.exit_on_error:
        raise OnInitError(message)
    log.error("%s (exit_on_error is off: starting anyway)", message)


async def _run(command: list[str], server: ServerConfig,
               timeout: float) -> tuple[int, list[str]]:
    assert server.on_init is not None
    extra = {**server.env, **server.on_init.env}
    env = {**os.environ, **{k.upper(): os.path.expandvars(v) for k, v in extra.items()}}
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
        **run_as(server.user, server.group),  # type: ignore[arg-type]
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = output.decode("utf-8", "replace").splitlines()
    return process.returncode or 0, [line for line in lines if line.strip()]


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"did not finish within exec_timeout ({timeout:g}s): killed"
    if isinstance(exc, OSError):
        return f"cannot start: {exc.strerror or exc}"
    return f"cannot start: {exc}"
