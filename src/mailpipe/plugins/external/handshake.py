"""go-plugin's handshake line, the first line a plugin prints on stdout:
`CORE|APP|NETWORK|ADDRESS|PROTOCOL[|SERVER-CERT[|MUX]]` (docs/plugins-external.md)."""

from __future__ import annotations

from dataclasses import dataclass

from mailpipe.plugins.base import PluginError
from mailpipe.plugins.external.wire import APP_PROTOCOL_VERSION, CORE_PROTOCOL_VERSION


class HandshakeError(PluginError):
    """The plugin's first stdout line is not a handshake mailpipe can use."""


@dataclass(frozen=True, slots=True)
class Handshake:
    app_version: int
    network: str  # "unix" or "tcp"
    address: str  # a socket path or host:port
    protocol: str

    @property
    def target(self) -> str:
        """The address as grpc dials it."""
        return f"unix:{self.address}" if self.network == "unix" else self.address


def parse_handshake(plugin: str, line: str) -> Handshake:
    """The handshake of `plugin`'s first stdout line; HandshakeError naming both if unusable."""
    text = line.strip()
    fields = text.split("|")
    if fields and fields[-1] == "" and len(fields) > 5:
        fields.pop()  # Go plugins always print field 6 (the TLS cert), empty without TLS
    problem = _problem(fields)
    if problem:
        raise HandshakeError(f"plugin {plugin!r}: bad handshake line {text[:200]!r}: {problem} "
                             "(a plugin must print nothing on stdout before its handshake)")
    return Handshake(int(fields[1]), fields[2], fields[3], fields[4])


def _problem(fields: list[str]) -> str | None:
    if not 4 <= len(fields) <= 7:
        return f"expected 4 to 7 fields separated by '|', got {len(fields)}"
    if fields[0] != str(CORE_PROTOCOL_VERSION):
        return f"core protocol version {fields[0]!r}, expected {CORE_PROTOCOL_VERSION}"
    if fields[1] != str(APP_PROTOCOL_VERSION):
        return f"app protocol version {fields[1]!r}, mailpipe speaks {APP_PROTOCOL_VERSION}"
    if fields[2] not in ("unix", "tcp"):
        return f"unknown address type {fields[2]!r} (unix or tcp)"
    if not fields[3]:
        return "empty address"
    protocol = fields[4] if len(fields) > 4 else "netrpc"  # go-plugin's default when absent
    if protocol != "grpc":
        return f"protocol {protocol!r}: mailpipe speaks only grpc"
    if len(fields) > 5 and len(fields[5]) > 50:
        return "the plugin offers TLS (a server certificate), which mailpipe does not ask for"
    return None
