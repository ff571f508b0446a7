"""The `drover` app as Click needs it for one command line: whole only where the line names it.

Typer builds a Click command from each command's signature every time `drover` runs, reading
every option's annotations (`migrate` alone has fifty): about 40 ms for the whole app, paid by
`drover --help` and by every command for all the others. Click runs at most one command per
line, and only one whose name is a word of that line (Click matches names exactly: no
prefixes, no normalising), so every other command is built from a stand-in: its name, help,
panel and flags as they are, no parameters. The root's help, the list of commands, "No such
command" and its suggestions read only those, and are the same as the whole app's
(tests/unit/test_cli_startup.py compares them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Any

import typer
from typer.main import get_command_name
from typer.models import CommandInfo, TyperInfo


def _stand_in(command: Callable[..., Any]) -> Callable[[], None]:
    """A callback with `command`'s name and help and no parameters (Typer reads both from it)."""

    def stand_in() -> None:
        # Unreachable: outlined() keeps whole every command whose name is on the line.
        raise RuntimeError(f"drover: {command.__name__} ran as a stand-in")

    stand_in.__name__ = command.__name__
    stand_in.__qualname__ = command.__qualname__
    stand_in.__doc__ = command.__doc__
    return stand_in


def _outlined_command(info: CommandInfo, words: Collection[str]) -> CommandInfo:
    callback = info.callback
    if callback is None or (info.name or get_command_name(callback.__name__)) in words:
        return info
    light = copy.copy(info)
    light.callback = _stand_in(callback)
    return light


def _outlined_group(info: TyperInfo, words: Collection[str]) -> TyperInfo:
    # A group whose name Typer would work out itself (none given) stays whole: never the case
    # in drover, where every add_typer names its group.
    if info.typer_instance is None or not isinstance(info.name, str) or info.name in words:
        return info
    light = copy.copy(info)
    light.typer_instance = outlined(info.typer_instance, words)
    return light


def outlined(app: typer.Typer, words: Collection[str]) -> typer.Typer:
    """A copy of `app` where each command or group whose name is not one of `words` (the
    command line) is a stand-in; the root's and groups' own options stay as they are."""
    light = copy.copy(app)
    light.registered_commands = [_outlined_command(c, words) for c in app.registered_commands]
    light.registered_groups = [_outlined_group(g, words) for g in app.registered_groups]
    return light
