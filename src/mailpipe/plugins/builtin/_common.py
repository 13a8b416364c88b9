"""What the built-in plugins share: their settings checked with pydantic and worded like the
rest of the configuration, address patterns, SMTP replies, client networks."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationError

from mailpipe.config import Section
from mailpipe.plugins.base import PluginError
from mailpipe.plugins.results import Disconnect, HookResult, Reject, Tempfail

__all__ = ["CIDR", "Code", "Enhanced", "Pattern", "Section", "parse", "refusal"]

M = TypeVar("M", bound=BaseModel)


def parse(name: str, model: type[M], config: dict[str, Any] | None) -> M:
    """The plugin's settings, or a PluginError naming each bad key in full
    (`plugins.plugin_config.chaos.rules[0].rate: got 2: ...`), as config errors are."""
    try:
        return model.model_validate(config or {})
    except ValidationError as exc:
        lines = [f"invalid configuration of the built-in plugin {name}:"]
        for error in exc.errors(include_url=False):
            loc = ("plugins", "plugin_config", name, *error["loc"])
            key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join(str(p) for p in loc))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (check its spelling)")
            elif isinstance(error["input"], dict):  # a rule across the section's keys
                lines.append(f"  {key}: {message}")
            else:
                lines.append(f"  {key}: got {error['input']!r}: {message}")
        raise PluginError("\n".join(lines)) from None


# ---- SMTP replies ---------------------------------------------------------------------------


def _code(value: int) -> int:
    if not 400 <= value <= 599:
        raise ValueError("expected an SMTP refusal code from 400 to 599")
    return value


def _enhanced(value: str) -> str:
    if not re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", value):
        raise ValueError("expected an enhanced status code like 4.7.1 or 5.7.1")
    return value


Code = Annotated[int, AfterValidator(_code)]
Enhanced = Annotated[str, AfterValidator(_enhanced)]


def same_class(code: int | None, enhanced: str | None) -> None:
    """A 4xx code goes with a 4.x.x enhanced code, a 5xx with 5.x.x."""
    if code is not None and enhanced and str(code)[0] != enhanced[0]:
        raise ValueError(f"enhanced code {enhanced} does not match code {code} "
                         f"(a {str(code)[0]}xx code takes {str(code)[0]}.x.x)")


def refusal(code: int, enhanced: str, message: str) -> HookResult:
    """A 4xx code tempfails, a 5xx code rejects; 421 also closes the connection, as the code
    says it does (RFC 5321 4.2.3)."""
    if code == 421:
        return Disconnect(message, enhanced)
    make = Tempfail if code < 500 else Reject
    return make(message, code, enhanced)


# ---- address patterns ---------------------------------------------------------------------


def compile_pattern(text: str) -> Callable[[str], bool]:
    """A glob (`*@example.com`, `@example.com` for a whole domain, `<>` for the null sender),
    or `re:REGEX` (searched; anchor it with ^ and $). Case-insensitive."""
    if text.startswith("re:"):
        try:
            regex = re.compile(text[3:], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return lambda address: regex.search(address) is not None
    glob = text.strip().lower()
    if glob == "<>":
        return lambda address: address == ""
    if glob.startswith("@"):
        glob = "*" + glob
    regex = re.compile(fnmatch.translate(glob), re.IGNORECASE)
    return lambda address: regex.match(address) is not None


def _patterns(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of address patterns")
    for item in value:
        compile_pattern(item)
    return value


Pattern = Annotated[list[str], BeforeValidator(_patterns)]


class Matcher:
    """Any of a list of patterns."""

    def __init__(self, patterns: list[str] | None) -> None:
        self.patterns = list(patterns or [])
        self._tests = [compile_pattern(p) for p in self.patterns]

    def __bool__(self) -> bool:
        return bool(self._tests)

    def __call__(self, address: str | None) -> bool:
        text = normal_address(address)
        return any(test(text) for test in self._tests)


def normal_address(address: str | None) -> str:
    return (address or "").strip().strip("<>").strip().lower()


# ---- client networks ----------------------------------------------------------------------


def _cidr(value: Any) -> Any:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError("expected an IP address or network like 10.0.0.0/8 or ::1") from None


CIDR = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_cidr)]


def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address (an IPv4-mapped IPv6 address as IPv4), None when not an IP."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def network_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, text: str,
               v4_prefix: int, v6_prefix: int) -> str:
    """The network a client is counted under (one IPv6 host often holds a whole /64)."""
    if ip is None:
        return text
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def exempted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
             networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)
