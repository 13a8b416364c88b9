"""Configuration: sources and their order, RoadRunner files, errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailpipe.config import ConfigError, load_config, parse_duration, parse_size


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config, path = load_config(cwd=tmp_path)
    assert path is None
    assert config.smtp.addr == "127.0.0.1:1025"
    assert config.http.addr == "127.0.0.1:8025"
    assert config.store_path == Path("./.mailpipe/mailpipe.db")
    assert config.smtp.max_message_size == 10 * 1024 * 1024
    assert config.smtp.max_recipients == 100
    assert config.store.max_messages == 5000


def test_rr_yaml_is_found_and_unknown_sections_ignored(tmp_path: Path) -> None:
    write(
        tmp_path / ".rr.yaml",
        """
version: "3"
rpc: {listen: "tcp://127.0.0.1:6001"}
server: {command: "php worker.php", relay: pipes}
smtp:
  addr: "127.0.0.1:2525"
  hostname: "buggregator.local"
  read_timeout: "60s"
  write_timeout: "10s"
  max_message_size: 10485760
  attachment_storage: {mode: "tempfile", temp_dir: "/tmp/smtp-attachments", cleanup_after: "1h"}
  pool: {num_workers: 4, max_jobs: 0, allocate_timeout: 60s, destroy_timeout: 60s}
""",
    )
    config, path = load_config(cwd=tmp_path)
    assert path == tmp_path / ".rr.yaml"
    assert config.smtp.hostname == "buggregator.local"
    assert config.smtp.read_timeout == 60.0
    assert config.smtp.attachment_storage.cleanup_after == 3600.0
    assert config.smtp.attachment_storage.mode == "tempfile"


def test_cli_beats_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "mailpipe.yaml",
        "smtp: {addr: '127.0.0.1:1111', hostname: file}\nhttp: {addr: '127.0.0.1:2222'}\n",
    )
    monkeypatch.setenv("MAILPIPE_SMTP__ADDR", "127.0.0.1:3333")
    monkeypatch.setenv("MAILPIPE_HTTP__ADDR", "127.0.0.1:4444")
    config, _ = load_config(cwd=tmp_path, overrides={"http": {"addr": "127.0.0.1:5555"}})
    assert config.smtp.hostname == "file"  # untouched by env: file value kept beside it
    assert config.smtp.addr == "127.0.0.1:3333"
    assert config.http.addr == "127.0.0.1:5555"


def test_several_listeners_inherit_limits(tmp_path: Path) -> None:
    write(
        tmp_path / "mailpipe.yaml",
        """
smtp:
  max_message_size: 5MB
  servers:
    - {name: apps, addr: "127.0.0.1:2525", max_recipients: 3}
    - {name: tls, addr: "127.0.0.1:2465", tls: self-signed, hostname: secure.test}
""",
    )
    config, _ = load_config(cwd=tmp_path)
    apps, tls = config.smtp.listeners()
    assert (apps.name, apps.max_recipients, apps.max_message_size) == ("apps", 3, 5 * 1024**2)
    assert tls.tls is not None and tls.tls.self_signed and tls.hostname == "secure.test"
    assert tls.max_recipients == 100


def test_errors_name_key_value_and_expectation(tmp_path: Path) -> None:
    write(
        tmp_path / "bad.yaml",
        """
smtp:
  max_message_size: lots
  read_timeout: forever
  max_recipents: 4
  servers: [{addr: "nowhere"}]
http: {auth: {type: bearer}}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "bad.yaml"))
    text = str(info.value)
    assert "smtp.max_message_size: got 'lots'" in text and "10MB" in text
    assert "smtp.read_timeout: got 'forever'" in text and "60s" in text
    assert "smtp.max_recipents: unknown key" in text
    assert "smtp.servers[0].addr" in text and "host:port" in text
    assert "http.auth" in text and "token" in text


def test_unreadable_yaml_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "broken.yaml", "smtp: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("500ms", 0.5), ("1h30m", 5400.0), (15, 15.0), ("2.5", 2.5), ("1d", 86400.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [(10485760, 10485760), ("10MB", 10 * 1024**2), ("512k", 512 * 1024), ("1 GiB", 1024**3)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1s", "soon", True, "10 parsecs"])
def test_bad_durations_raise(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_serve_with_broken_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp:\n  max_recipients: many\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "smtp.max_recipients: got 'many'" in result.stderr
    assert "integer" in result.stderr


def test_check_config_prints_effective_values(tmp_path: Path) -> None:
    write(tmp_path / "mailpipe.yaml", "smtp: {hostname: shown.test}\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MAILPIPE_SMTP__MAX_RECIPIENTS": "7"},
    )
    assert result.returncode == 0, result.stderr
    assert "hostname: shown.test" in result.stdout
    assert "max_recipients: 7" in result.stdout
