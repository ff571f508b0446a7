"""Untrusted text made safe to print on a terminal: what the CLI shows from Redis or echoes back.

Redis content is not trusted (anyone with its password writes it), and neither is what a
command line echoes back in an error. Printed as it came, a control character acts on the
terminal instead of being read (OSC 52 sets the clipboard, CSI moves the cursor or clears the
screen, a newline forges a line of output, a bidi override reorders one), and in Rich markup
`[red]` styles the rest of a line while a stray `[/x]` raises MarkupError (a traceback). Kept
free of Rich's rendering machinery so that `drover --help` stays light.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Unicode categories never printed as they come: every "C" category (C0, DEL and C1
# controls, format characters such as bidi overrides, surrogates, private use, unassigned)
# and the line and paragraph separators.
UNSHOWN_CATEGORIES = ("C", "Zl", "Zp")


def plain(value: object) -> str:
    """`value` as text with every control or format character stripped."""
    return "".join(
        c for c in str(value) if not unicodedata.category(c).startswith(UNSHOWN_CATEGORIES)
    )


# How `escaped` writes the controls everyone knows; any other as \xHH, \uHHHH or \UHHHHHHHH.
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escaped(value: object) -> str:
    """`value` as one line of text with every control or format character written as its
    escape, as Python's repr writes it (`\\n`, `\\x00`, `\\u202e`): what a one-line error
    quotes (a path, a config key, Redis content) stays readable and names the right thing,
    where stripping would make `dead.toml\\n` read as `dead.toml`, another file."""
    return "".join(_escape(c) for c in str(value))


def _escape(c: str) -> str:
    if not unicodedata.category(c).startswith(UNSHOWN_CATEGORIES):
        return c
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    code = ord(c)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def cell(value: object) -> str:
    """`value` for Rich markup (a table cell, a progress description): stripped as `plain`,
    and escaped so that `[red]` shows literally instead of styling."""
    from rich.markup import escape

    return escape(plain(value))


def plain_data(value: Any) -> Any:
    """A JSON-like structure with every string in it (keys too) made `plain`."""
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, dict):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    return value
