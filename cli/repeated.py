"""An option given twice on one command line is refused, not resolved to its last value.

Click keeps the last value of an option given twice: `drover migrate web --from kvm1 --from
kvm2` would move the guest from kvm2, and `--live ... --no-live` would quietly drop the first.
The operator asked for both; drover cannot know which was meant, so it says so, before the
command runs. Options meant to repeat (`--state`) are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

END_OF_OPTIONS = "--"

# Click's classes are read by what they have, not by class: Typer runs on a copy of Click of
# its own (typer._click), whose classes are not the `click` package's.
Command = Any


def _option_named(command: Command, word: str) -> Any | None:
    for param in command.params:
        if word in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
            return None if param.param_type_name != "option" else param
    return None


def _subcommand(command: Command, word: str) -> Command | None:
    if not hasattr(command, "get_command"):
        return None
    with typer.Context(command) as ctx:
        return command.get_command(ctx, word)


def repeated_option(root: Command, args: Sequence[str]) -> str | None:
    """The usage error for an option given twice on `args` (None: there is none).

    Walks the line as Click will read it: options of the command named so far, a word that
    names a subcommand moves on to it; an unknown option or command is left for Click to
    refuse with its own message.
    """
    command, seen = root, dict[tuple[int, str], str]()
    words = iter(args)
    for word in words:
        if word == END_OF_OPTIONS:
            break
        if not word.startswith("-") or word == "-":
            command = _subcommand(command, word) or command
            continue
        name, inline, _ = word.partition("=")
        option = _option_named(command, name)
        if option is None:
            continue
        if not option.multiple and not option.count and option.name is not None:
            key = (id(command), option.name)
            if key in seen:
                if seen[key] == name:
                    return f"{name} is given twice: give it once"
                return f"{seen[key]} and {name} are both given: give one of them"
            seen[key] = name
        if not option.is_flag and not inline:
            for _ in range(option.nargs):  # its value(s), even one that starts with "-"
                next(words, None)
    return None
