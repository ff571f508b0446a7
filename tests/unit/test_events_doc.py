"""docs/events.md names every event drover emits, and only those.

Followers (`drover events`, scripts reading `--json`, Flower users reading worker logs) learn
the event names from that page. The names are read out of the source the way they are
emitted: `log.<level>("name", ...)` through the structlog chain, and `job_event` /
`migration_event` for events written straight to a stream. A name built at run time (an
f-string) is a pattern (`*.refused`) that the page must spell out at least once.
"""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

from config import events
from config.event_shape import EVENTS_RECLAIMED

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("config", "jobs", "schedules", "worker", "producer")
DOC = REPO / "docs" / "events.md"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
# Event builders and the position of the event name among their arguments.
BUILDERS = {"job_event": 0, "migration_event": 2}
# Methods that write an event to a stream, and the position of its name after the record's id
# (jobs/evacuations.py `EvacuationService._event(evacuation_id, name, ...)`).
METHOD_BUILDERS = {"_event": 1}
# A table row's first cell: one or more `name` spellings.
_ROW = re.compile(r"^\|\s*(?P<cell>`[^|]+)\|", re.MULTILINE)
_NAME = re.compile(r"`([a-z_<>]+(?:\.[a-z_<>]+)+)`")
# Module constants that hold an event name (`log.info(EVENTS_LOST, ...)`).
CONSTANTS = {"EVENTS_LOST": events.EVENTS_LOST, "EVENTS_RECLAIMED": EVENTS_RECLAIMED}


def _names_of(node: ast.expr) -> set[str]:
    """The event names an argument can evaluate to; a run-time part becomes `*`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _names_of(node.body) | _names_of(node.orelse)
    if isinstance(node, ast.JoinedStr):
        parts = [str(v.value) if isinstance(v, ast.Constant) else "*" for v in node.values]
        return {"".join(parts)}
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return {CONSTANTS[node.id]}
    return set()  # a parameter passed through (migration_event's own `name`)


def emitted_names() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                index = None
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr in LOG_METHODS
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "log"
                ):
                    index = 0
                elif isinstance(func, ast.Name) and func.id in BUILDERS:
                    index = BUILDERS[func.id]
                elif isinstance(func, ast.Attribute) and func.attr in METHOD_BUILDERS:
                    index = METHOD_BUILDERS[func.attr]
                if index is not None and len(node.args) > index:
                    names |= {n for n in _names_of(node.args[index]) if "." in n}
    return names


def documented_names() -> set[str]:
    text = DOC.read_text()
    return {name for row in _ROW.finditer(text) for name in _NAME.findall(row["cell"])}


def test_the_source_emits_the_events_it_is_known_for() -> None:
    """The scan itself finds what it must: it would otherwise pass on an empty set."""
    names = emitted_names()
    assert {"job.queued", "prepare.ready", "migration.postcopy_started", "events.lost"} <= names
    assert "*.refused" in names
    assert len(names) > 50, sorted(names)


def test_every_emitted_event_is_in_the_doc() -> None:
    documented = documented_names()
    missing = sorted(
        name
        for name in emitted_names()
        if not any(fnmatchcase(doc_name, name) for doc_name in documented)
    )
    assert missing == [], f"emitted but not in docs/events.md: {missing}"


def test_every_event_in_the_doc_is_emitted() -> None:
    emitted = emitted_names()
    stale = sorted(
        name
        for name in documented_names()
        if not any(fnmatchcase(name, pattern) for pattern in emitted)
    )
    assert stale == [], f"in docs/events.md but never emitted: {stale}"


def test_the_progress_row_names_every_progress_field() -> None:
    """`migration.progress` carries every field of a sample, the disk ones included."""
    from dataclasses import fields

    from worker.monitor import Progress

    row = next(line for line in DOC.read_text().splitlines() if "`migration.progress`" in line)
    missing = [f.name for f in fields(Progress) if f"`{f.name}`" not in row]
    assert missing == [], f"migration.progress fields not in docs/events.md: {missing}"
