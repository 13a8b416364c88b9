"""A clone of the repository alone must be enough: nothing in it may point outside of it.

The project was built beside a reference folder next to the checkout (named by `_NAME`
below), which a user who clones the repository does not have. Its schema and test messages
live here now (mailpipe/schema/, tests/data/corpus/). These tests keep any file from reaching
back for it, by a relative path in a doc or a path put together in code, and collect the
whole suite from a clone with nothing beside it (the committed state: git clones HEAD).
`.ci/run` runs the suite itself from such a clone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

_NAME = "sha" + "red"  # spelt apart so that this file does not match itself
# The folder as written in docs (`../NAME`, either slash; `NAME/spec/...`, `NAME/corpus/...`)
# and a path built in code (`ROOT.parent / "NAME"`, `joinpath('NAME')`, `join(x, "NAME")`).
REFERENCE = re.compile(
    rf"\.\.[/\\]{_NAME}\b|\b{_NAME}/(spec|corpus|hooks)\b|[/(,]\s*[\"']{_NAME}[\"']".encode()
)
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def repository_files() -> list[Path]:
    """The files a clone has: git's list (tracked plus new, not ignored) or, without git, the
    tree minus the virtualenv and caches."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name]
    return [
        path
        for path in ROOT.rglob("*")
        if path.is_file() and not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts)
    ]


def references_in(data: bytes) -> list[str]:
    return [match.group().decode(errors="replace") for match in REFERENCE.finditer(data)]


def test_no_file_refers_to_the_reference_folder_beside_the_checkout() -> None:
    files = repository_files()
    assert ROOT / "README.md" in files
    found = {}
    for path in files:
        if path.is_file():  # a file deleted but not yet committed is still listed
            hits = references_in(path.read_bytes())
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert found == {}


@pytest.mark.parametrize(
    "line",
    [
        f"see [the contract](../{_NAME}/spec/email-event.schema.json)",
        f"data = ROOT.parent / '{_NAME}' / 'corpus'",
        f'SHARED = Path(__file__).resolve().parent.parent.parent / "{_NAME}"',
        f'os.path.join(here, "..", "{_NAME}")',
        f"Byte layout ({_NAME}/spec/protocols.md section 1)",
        f"..\\{_NAME}\\corpus",
    ],
)
def test_each_way_of_referring_to_it_is_caught(line: str) -> None:
    assert references_in(line.encode())


@pytest.mark.parametrize(
    "line",
    [
        "plain data shared by the core, the transport and the event builder",
        "def shared_nats() -> None:",
        "the shared contract, then its own cases",
    ],
)
def test_the_word_alone_is_not_a_reference(line: str) -> None:
    assert references_in(line.encode()) == []


def test_the_suite_collects_from_a_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("not a git checkout")
    clone = tmp_path / "mailpipe"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mailpipe"]
    # The clone's own sources, not the checkout's the virtualenv points at.
    env = {**os.environ, "PYTHONPATH": str(clone / "src")}
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert " collected" in collected.stdout.splitlines()[-1]
