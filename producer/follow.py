"""Following a job live on a terminal: event lines above a Rich progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from jobs.evacuation import Evacuation
from jobs.model import Job
from producer.api import Drover
from producer.render import event_line, figure
from producer.text import cell


def follow(d: Drover, job_id: str, console: Console, timeout: float | None = None) -> Job:
    """Print the job's events as they come, with a bar for the memory transfer; the final job.

    Progress events are printed as lines too, so a log or a pipe shows them (once a second).
    The stream is read once (jobs/follow.py): it ends with the job, so no wait follows it.
    """
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("migrating", total=None, visible=False)
        for ev in d.events(job_id, follow=True, timeout=timeout):
            if ev.get("event") == "migration.progress":
                # A figure that is no number is unknown (figure): the bar shows no total.
                total, remaining = figure(ev, "data_total"), figure(ev, "data_remaining")
                bar.update(
                    task,
                    visible=True,
                    description=cell(f"{ev.get('domain')} [{ev.get('stage')}]"),
                    total=total or None,
                    completed=max(total - remaining, 0) if total and remaining is not None else 0,
                )
            bar.console.print(event_line(ev), markup=False, soft_wrap=True)
    # The events were followed to the job's end: its record is final, read it once.
    return d.job(job_id)


def follow_evacuation(
    d: Drover, evacuation_id: str, console: Console, timeout: float | None = None
) -> Evacuation:
    """Print an evacuation's events as they come, with a bar of its children that have ended."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("evacuating", total=None, visible=False)
        queued = ended = 0
        for ev in d.events(evacuation_id, follow=True, timeout=timeout):
            name = ev.get("event")
            if name == "evacuation.child_queued":
                queued += 1
            elif name == "evacuation.child_ended":
                ended += 1
            if queued:
                bar.update(task, visible=True, total=queued, completed=ended)
            bar.console.print(event_line(ev), markup=False, soft_wrap=True)
    return d.evacuations.get(evacuation_id)
