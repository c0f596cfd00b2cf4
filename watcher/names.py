"""File names as the database stores them: always valid text, and reversible.

Linux file names are bytes; a CD written on another system can hold names
that are not UTF-8 (Python shows those bytes as surrogates), which no
database text column accepts. Such bytes are stored as ``\\xNN`` (and a
literal backslash as ``\\\\``), so every name can be shown, and turned back
into the exact name on disk by ``from_text``.
"""

import os
import re

_ESCAPED = re.compile(r"\\\\|\\x([0-9a-f]{2})")


def to_text(path) -> str:
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "surrogateescape")
    if "\\" not in text and not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def from_text(text: str) -> str:
    def unescape(match):
        if match.group(0) == "\\\\":
            return "\\"
        return chr(0xDC00 + int(match.group(1), 16))
    return _ESCAPED.sub(unescape, text)
