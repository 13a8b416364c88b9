"""A spamd of mailpipe's own: with `spamassassin.start: true`, `mailpipe serve` (so `make
run`) runs Debian's spamd as its child on the loopback address `spamassassin.addr`, and
stops it when it stops; the tests start theirs with the same arguments.

That spamd runs the rules the spamassassin package ships (or the last sa-update's), with
local tests only: no DNS blocklist lookups, so nothing of a captured email leaves the
machine and no check waits on an unreachable resolver. No Bayes learning and no per-user
settings either: the same email gets the same score every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from pathlib import Path

from mailpipe.capture.server import format_addr
from mailpipe.checks.spam import SpamChecker, SpamCheckError, check_settings, spamd_address
from mailpipe.children import die_with_parent

log = logging.getLogger("mailpipe.spamd")
# Debian installs spamd in /usr/sbin, which an ordinary user's PATH may not hold.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
INSTALL_HINT = "install it with apt-get install spamassassin spamd"
READY_TIMEOUT = 120.0  # loading the rules takes seconds, more without sa-compile
STOP_TIMEOUT = 10.0
LOG_TAIL = 2000  # bytes of spamd's log quoted when it fails


class SpamdStartError(Exception):
    """spamd could not be started."""


def find_spamd() -> str | None:
    return shutil.which("spamd", path=SEARCH_PATH)


def spamd_argv(executable: str, host: str, port: int) -> list[str]:
    """spamd in the foreground on host:port, logging to its stderr."""
    return [
        executable,
        f"--listen={format_addr((host, port))}",
        "--local",  # no network tests (see the module's docstring)
        "--nouser-config",
        "--max-children=2",  # each child holds the rules: ~100 MB
        "--min-children=1",
        "--syslog=stderr",
        "--cf=use_bayes 0",
        "--cf=bayes_auto_learn 0",
    ]


def become_nobody() -> None:
    """In the child before exec, as root: become nobody (spamd would itself, but later)."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)


class SpamdDaemon:
    """spamd as a child process on a loopback host:port; its log goes to `log_path`."""

    def __init__(self, addr: str, log_path: Path) -> None:
        check_settings(addr, start=True)
        address = spamd_address(addr)
        assert not isinstance(address, str)
        self.host, self.port = address
        self.addr = addr
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Spawn spamd; ready a few seconds later (`wait_ready`), which is logged."""
        executable = find_spamd()
        if executable is None:
            raise SpamdStartError(f"spamassassin.start: spamd is not installed ({INSTALL_HINT})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *spamd_argv(executable, self.host, self.port),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    # a mailpipe killed outright takes its spamd along, port and all
                    preexec_fn=die_with_parent(become_nobody),
                )
            except OSError as exc:
                raise SpamdStartError(f"spamassassin.start: cannot run {executable}: "
                                      f"{exc.strerror or exc}") from None
        log.info("starting spamd on %s (pid %d, log %s)", self.addr, self.process.pid,
                 self.log_path)
        self._watcher = asyncio.create_task(self._watch())

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until spamd answers PING; SpamdStartError if it exits or stays silent."""
        checker = SpamChecker(self.addr, timeout=2.0)
        async with asyncio.timeout(timeout):
            while True:
                if self.process is None or self.process.returncode is not None:
                    raise SpamdStartError(self._exit_message())
                try:
                    await checker.ping()
                    return
                except SpamCheckError:
                    await asyncio.sleep(0.2)

    async def _watch(self) -> None:
        try:
            await self.wait_ready()
            log.info("spamd ready on %s", self.addr)
        except (SpamdStartError, TimeoutError) as exc:
            if not self._stopping:
                log.error("spamd did not start: %s", exc or "no answer to PING")
            return
        assert self.process is not None
        await self.process.wait()
        if not self._stopping:
            log.error("%s; spam checks fail until mailpipe restarts", self._exit_message())

    def _exit_message(self) -> str:
        code = self.process.returncode if self.process is not None else None
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(max(0, os.path.getsize(self.log_path) - LOG_TAIL))
                tail = log_file.read().decode("utf-8", errors="replace").strip()
        except OSError:
            tail = ""
        return f"spamd exited with status {code}" + (f"; its log ends:\n{tail}" if tail else "")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()  # spamd stops its children on SIGTERM
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
            log.info("spamd stopped")
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
