"""The real lab for integration and fault tests: its own lab id, so a demo lab can run beside it.

Registered as a plugin by tests/conftest.py, so tests/lab and tests/faults share one lab.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from config.settings import load_settings
from jobs.model import Job
from lab import control
from producer.api import Drover

# libvirt prints every error to stderr unless told otherwise; we handle them.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# A lab run spread over processes (pytest-xdist's gw0, gw1, ...) gives each process labs of its
# own: every lab id a test uses (the session's, and a module's own: TLS, Linux, lifecycle) moves
# up by LAB_ID_STRIDE per process. Two modules that share a lab (the Linux lab) may land in two
# processes, and would otherwise bring the same lab up twice.
LAB_ID_STRIDE = 10
XDIST_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def lab_id(base: int | str) -> str:
    """This process's id for the lab a test names by `base` (unchanged outside xdist)."""
    return str(int(base) + LAB_ID_STRIDE * XDIST_INDEX)


TEST_LAB_ID = lab_id(os.environ.get("DROVER_TEST_LAB_ID", "9"))
JOB_TIMEOUT_S = 180.0
# How long a start refused by libvirt's state change lock is asked again before the host's
# libvirtd is restarted (each refusal itself takes libvirt's 30 s lock wait).
LOCK_HELD_S = 90.0
# How many of the newest jobs `settle` looks through for one still moving a guest: more
# than a test module starts before its fixtures settle again.
JOBS_SCANNED = 200
# Three hosts and four idle guests (plus dirty-1), enough to drain lab1 onto lab2 and lab3.
LAB_HOSTS = 3
LAB_IDLE_GUESTS = 4
IDLE_GUESTS = tuple(f"idle-{i}" for i in range(1, LAB_IDLE_GUESTS + 1))


@dataclass(frozen=True)
class DomainView:
    """A domain as one host's libvirtd reports it (None fields: not defined there)."""

    exists: bool
    active: bool
    persistent: bool
    state: int | None


def view(uri: str, name: str) -> DomainView:
    conn = libvirt.open(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return DomainView(False, False, False, None)
        return DomainView(True, bool(dom.isActive()), bool(dom.isPersistent()), dom.state()[0])
    finally:
        conn.close()


@dataclass
class Lab:
    status: dict[str, Any]
    config: str
    drover: Drover

    def uri(self, host: str) -> str:
        return str(self.status["hosts"][host]["operator_uri"])

    def log_dir(self, host: str) -> Path:
        """`host`'s log directory (libvirtd.log, qemu/), as its namespace mounts it."""
        return Path(self.config).parent / "hosts" / host / "log"

    def view(self, host: str, domain: str) -> DomainView:
        return view(self.uri(host), domain)

    def running_on(self, domain: str) -> list[str]:
        return [h for h in self.status["hosts"] if self.view(h, domain).active]

    def migrate(self, domain: str, src: str, dst: str, **opts: Any) -> Job:
        job_id = self.drover.submit(domain=domain, src=src, dst=dst, **({"live": True} | opts))
        return self.drover.wait(job_id, timeout=JOB_TIMEOUT_S)

    def set_paused(self, domain: str, paused: bool) -> None:
        """Pause or resume `domain` wherever it runs."""
        for host in self.running_on(domain):
            conn = libvirt.open(self.uri(host))
            try:
                dom = conn.lookupByName(domain)
                is_paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
                if paused and not is_paused:
                    dom.suspend()
                elif not paused and is_paused:
                    dom.resume()
            finally:
                conn.close()

    def hosts(self) -> list[str]:
        return sorted(self.status["hosts"])

    def all_home(self, host: str = "lab1") -> None:
        """Every guest back on `host` and every host enabled, whatever a test left behind.

        Drains the other hosts onto `host` with drover's own evacuations (in parallel).
        """
        for name in self.hosts():
            self.drover.set_host_enabled(name, True)
        others = [h for h in self.hosts() if h != host]
        ids = [self.drover.evacuate(host=h, to=[host]) for h in others]
        for evacuation_id in ids:
            ev = self.drover.wait_evacuation(evacuation_id, JOB_TIMEOUT_S)
            assert ev.state.value == "drained", ev.reason
        for name in self.hosts():
            self.drover.set_host_enabled(name, True)

    def settle(self, domain: str) -> None:
        """Wait out every job still moving `domain`: a test that failed mid-migration leaves
        it in flight (on both hosts during switch-over), and the next test must start from
        where that job leaves the guest, not fail on it too."""
        for record in self.drover.jobs(limit=JOBS_SCANNED):
            if isinstance(record, Job) and record.spec.domain == domain and not record.terminal:
                self.drover.wait(record.id, JOB_TIMEOUT_S)

    def revive_lost(self, domain: str, host: str = "lab1") -> bool:
        """Restart `domain` from its definition on `host` when a failed case left it lost
        there: paused with its post-copy failed, on no other host, no job moving it (libvirt
        then still holds the failed migration's job on it, so no resume can run). True when
        it did; the next case then starts from a running guest, not from the last case's
        failure."""
        self.settle(domain)
        where = self.running_on(domain)
        if not where and self.view(host, domain).persistent:
            self.start_again(domain, host)
            print(f"{domain}: left shut off on {host} by an earlier case; started again")
            return True
        if where != [host]:
            return False
        conn = libvirt.open(self.uri(host))
        try:
            dom = conn.lookupByName(domain)
            lost = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
            if tuple(dom.state()) != lost or not dom.isPersistent():
                return False
            dom.destroy()
        finally:
            conn.close()
        self.start_again(domain, host)
        print(f"{domain}: lost on {host} by an earlier case (post-copy failed); restarted")
        return True

    def start_again(self, domain: str, host: str = "lab1") -> None:
        """Start `domain` from its definition on `host`, as an operator would after its
        copies were destroyed. libvirt may still hold the destroyed copy's migration job,
        whose state change lock refuses the start (over two minutes, once in a full run):
        asked again for LOCK_HELD_S, then the operator's remedy, `host`'s libvirtd restarted
        (its jobs go with it), and started on the new daemon."""

        def started() -> bool:
            conn = libvirt.open(self.uri(host))
            try:
                dom = conn.lookupByName(domain)
                if not dom.isActive():
                    dom.create()
                return True
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_TIMEOUT:
                    raise
                return False
            finally:
                conn.close()

        try:
            wait_for(started, LOCK_HELD_S, f"{domain} to start again on {host}")
        except AssertionError:
            print(f"{domain}: libvirt on {host} held its state change lock; libvirtd restarted")
            control.restart_libvirtd(host)
            wait_for(started, LOCK_HELD_S, f"{domain} to start on {host}'s new libvirtd")

    def home(self, domain: str, host: str = "lab1") -> None:
        """Bring `domain` back to `host` through drover if a previous test left it elsewhere."""
        self.settle(domain)
        where = self.running_on(domain)
        assert len(where) == 1, f"{domain} runs on {where}"
        if where[0] != host:
            job = self.migrate(domain, where[0], host)
            assert job.state.value == "succeeded", job.reason


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def lab_env() -> Iterator[None]:
    old = os.environ.get("DROVER_LAB_ID")
    os.environ["DROVER_LAB_ID"] = TEST_LAB_ID
    control.down()  # whatever an interrupted earlier run left behind
    yield
    control.down()
    if old is None:
        os.environ.pop("DROVER_LAB_ID", None)
    else:
        os.environ["DROVER_LAB_ID"] = old


@pytest.fixture(scope="session")
def lab(lab_env: None) -> Iterator[Lab]:
    state = control.up(LAB_HOSTS, guests=LAB_IDLE_GUESTS)
    try:
        lab = Lab(control.status(), state.config, Drover(load_settings(state.config)))
        # dirty-1 keeps a core busy; it runs only in the tests that need it (`dirty_running`).
        lab.set_paused("dirty-1", True)
        yield lab
    finally:
        control.down()


def replace_config(path: Path, text: str) -> None:
    """Write a config file whole: a new file renamed over it, as an operator's tools should,
    so that a worker re-reading it never finds it half-written."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(text)
    os.replace(staged, path)


@pytest.fixture
def lab_config_file(lab: Lab) -> Iterator[Path]:
    """The lab's registry file, for a test to change (workers re-read it when it changes:
    `replace_config`); restored as it was afterwards."""
    path = Path(lab.config)
    original = path.read_text()
    yield path
    replace_config(path, original)


@pytest.fixture
def dirty_running(lab: Lab) -> Iterator[None]:
    """dirty-1 running (on lab1) for this test, paused again afterwards."""
    lab.home("dirty-1")
    lab.set_paused("dirty-1", False)
    yield
    lab.home("dirty-1")
    lab.set_paused("dirty-1", True)
