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
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from config.addresses import MAX_SHOWN_CHARS, shown

T = TypeVar("T")

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


def cut_short(message: str, *typed: str | Iterable[str] | None) -> str:
    """`message` with every value the user typed (and each comma-separated part of one) that
    is longer than config/addresses.py shown() quotes cut as shown() cuts it.

    A refusal built below the command line (the registry's unknown host, a job id not found,
    a --since or --cron that does not read) quotes the value whole, and a value may be
    megabytes: the command says what it refused in one readable line all the same. A value
    is found as the message quotes it (its repr, or as it is) and a part as the lists' own
    refusals quote one (`--state a,b`).
    """
    values: set[str] = set()
    for value in typed:
        for one in [value] if isinstance(value, str) else value or ():
            values |= {one, *(part.strip() for part in one.split(","))}
    for value in sorted((v for v in values if len(v) > MAX_SHOWN_CHARS), key=len, reverse=True):
        message = message.replace(repr(value), shown(value)).replace(value, shown(value))
    return message


def quoting_short(fn: Callable[[], T], *typed: str | Iterable[str] | None) -> Callable[[], T]:
    """`fn`, whose every error quotes the `typed` values at most as shown() does (cut_short):
    its message is cut where it is raised, so whoever turns it into a line (the CLI's
    guarded) shows it cut, and its type is kept (the exit code follows from it)."""

    def run() -> T:
        try:
            return fn()
        except Exception as exc:
            exc.args = tuple(cut_short(a, *typed) if isinstance(a, str) else a for a in exc.args)
            raise

    return run
