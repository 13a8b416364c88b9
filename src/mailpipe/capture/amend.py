"""Header changes asked for by plugins (MODIFY), made on the message's bytes.

Everything but the header lines named is kept byte for byte: the body, the other headers,
their order and folding. New lines go on top, as a relay's trace headers do, in the line
ending the message itself uses.
"""

from __future__ import annotations

import re

_FIELD = re.compile(rb"([^:\s]+)[ \t]*:")


def amend_headers(raw: bytes, add: list[tuple[str, str]],
                  replace: list[tuple[str, str]]) -> bytes:
    """`raw` with every field named in `replace` removed, then `replace` and `add` lines
    (in that order) put at the top. `raw` itself when there is nothing to do."""
    if not add and not replace:
        return raw
    eol = b"\r\n" if b"\r\n" in raw[:raw.find(b"\n") + 1 or len(raw)] else b"\n"
    if replace:
        raw = _without(raw, {name.lower().encode() for name, _ in replace})
    lines = [f"{name}: {value}".encode() + eol for name, value in (*replace, *add)]
    return b"".join(lines) + raw


def _without(raw: bytes, names: set[bytes]) -> bytes:
    """The message with the header fields in `names` (lower case) and their folded
    continuation lines left out; the body untouched."""
    out: list[bytes] = []
    dropping = False
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):  # end of the header block
            out.append(raw[pos:])
            break
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if not dropping:
                out.append(line)
        else:
            match = _FIELD.match(line)
            dropping = bool(match) and match.group(1).lower() in names
            if not dropping:
                out.append(line)
        pos = end
    return b"".join(out)
