"""Packages a library imports eagerly that a `drover` command rarely uses, run on first use.

Why: redis-py's package `__init__` imports its `redis.asyncio` client package (about a third of
`import redis`). No producer command uses the asyncio client, yet every command that reads
Redis paid for it (issue 17). `defer_all` runs before the library is first imported
(cli/launch.py, the one entry point) and adds a finder in front of the import system's own: a
deferred package is found where it would be, and its module created as usual, but its
`__init__` runs only when one of its names is first read (a module `__getattr__`, PEP 562).
Code that uses it gets the real names, only later.

Not `importlib.util.LazyLoader`: its stand-in loads on any attribute read, `__path__` too, and a
submodule imported first (`import redis.asyncio.client`) then runs twice, once through the
package's `__init__` and once on its own, with two copies of every class. Here `__path__` is
set from the start, and a submodule imported first is the one the `__init__` finds.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
from types import ModuleType

# importlib.abc would import importlib.resources, tempfile and random: a third of a command's
# start-up saving. The finder and the loader below are the protocols the import system calls.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.abc import Loader

# The packages deferred for every command run in this process.
DEFERRED = frozenset({"redis.asyncio"})


class DeferredInit:
    """Runs the package's own loader on the first read of a name the module lacks."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__getattr__ = self._first_use(module)  # type: ignore[method-assign]

    def _first_use(self, module: ModuleType) -> Callable[[str], object]:
        once = threading.RLock()  # a second thread waits for the first one's load

        def load(name: str) -> object:
            with once:
                if module.__dict__.get("__getattr__") is load:
                    del module.__dict__["__getattr__"]
                    self.loader.exec_module(module)
            if name in module.__dict__:
                return module.__dict__[name]
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        return load


class DeferringFinder:
    """Finds the packages in `names` where the path finder would, their `__init__` deferred."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return spec
        spec.loader = DeferredInit(spec.loader)  # type: ignore[assignment]
        return spec


def defer_all() -> None:
    """Defer the DEFERRED packages in this process (once)."""
    if not any(isinstance(finder, DeferringFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeferringFinder(DEFERRED))
