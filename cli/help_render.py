"""Typer's help renderer, imported without two Rich modules its help never uses in drover.

typer/rich_utils.py, which draws every `--help`, imports at its top rich.markdown (and with it
markdown-it) for help written in Markdown, which drover's is not (Typer's "rich" markup mode),
and rich.traceback (and with it pygments and rich.pretty) for the pretty traceback of an
uncaught exception: together about a third of a `drover --help`. `load` imports it with
stand-ins in their place that import the real class when first used, so a Markdown help or a
pretty traceback still works, only later; Rich's own modules are left as they are (the
stand-ins are gone from sys.modules once Typer's module has its names).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

RENDERER = "typer.rich_utils"


class _Markdown:
    """rich.markdown.Markdown, imported when Typer makes one (Markdown help only)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from rich.markdown import Markdown

        return Markdown(*args, **kwargs)


class _Traceback:
    """rich.traceback.Traceback, imported when Typer shows an uncaught exception."""

    @staticmethod
    def from_exception(*args: Any, **kwargs: Any) -> Any:
        from rich.traceback import Traceback

        return Traceback.from_exception(*args, **kwargs)


def _module(name: str, **names: Any) -> ModuleType:
    module = ModuleType(name, "drover's stand-in while typer.rich_utils is imported")
    for key, value in names.items():
        setattr(module, key, value)
    return module


def load() -> None:
    """Import typer.rich_utils, lighter; as Typer itself does if it no longer fits the
    stand-ins (an ImportError leaves no half-made module behind)."""
    if RENDERER in sys.modules:
        return
    stand_ins = {
        "rich.markdown": _module("rich.markdown", Markdown=_Markdown),
        "rich.traceback": _module("rich.traceback", Traceback=_Traceback),
    }
    placed = [name for name in stand_ins if name not in sys.modules]
    for name in placed:
        sys.modules[name] = stand_ins[name]
    try:
        __import__(RENDERER)
    except ImportError:
        pass  # imported for real below, by Typer when it draws the help
    finally:
        for name in placed:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]
