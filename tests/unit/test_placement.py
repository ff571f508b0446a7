"""The evacuation planner's policy on its own: memory, CPU, anti-affinity, availability."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from jobs.evacuation import Evacuation, EvacuationSpec, EvacuationState, Placement
from jobs.spec import TimeoutAction
from worker.evacuation_plan import child_spec
from worker.placement import OFFLINE_ESTIMATE_S, Candidate, Estimate, Guest, plan

ESTIMATE = Estimate(startup_s=2.0, mib_per_s=100.0)


def guest(name: str, mib: int = 64, *, active: bool = True, group: str | None = None) -> Guest:
    return Guest(name, f"uuid-{name}", mib, active, persistent=True, group=group)


def where(placements: list) -> dict[str, str | None]:  # type: ignore[type-arg]
    return {p.domain: p.destination for p in placements}


def test_largest_first_on_the_host_with_most_room_ties_by_name() -> None:
    guests = [guest("a", 64), guest("b", 256), guest("c", 128)]
    hosts = [Candidate("lab3", 512), Candidate("lab2", 512)]
    placements = plan(guests, hosts, {}, ESTIMATE)
    assert [p.domain for p in placements] == ["b", "c", "a"]
    # b -> lab2 (tie, name); c -> lab3 (512 > 256); a -> lab3 (384 > 256)
    assert where(placements) == {"b": "lab2", "c": "lab3", "a": "lab3"}
    assert placements[0].estimate_s == 4.6  # 2 s start-up + 256 MiB at 100 MiB/s


def test_memory_counts_what_the_plan_already_placed() -> None:
    placements = plan([guest("a", 300), guest("b", 300)], [Candidate("lab2", 500)], {}, ESTIMATE)
    assert where(placements) == {"a": "lab2", "b": None}
    assert placements[1].reason == "no destination (lab2: 200 MiB free, needs 300 MiB)"


def test_cpu_refusal_and_anti_affinity_are_reasons() -> None:
    lab2 = Candidate("lab2", 4096, cpu_refusals={"uuid-a": "cannot run the guest's CPU model"})
    lab3 = Candidate("lab3", 4096, groups=Counter({"web": 1}))
    placements = plan([guest("a"), guest("b", group="web")], [lab2, lab3], {}, ESTIMATE)
    by_name = {p.domain: p for p in placements}
    assert by_name["a"].destination == "lab3"
    assert by_name["b"].destination == "lab2"
    two_web = plan(
        [guest("x", group="db"), guest("y", group="db")], [Candidate("h", 9999)], {}, ESTIMATE
    )
    assert two_web[1].destination is None
    assert "anti-affinity group db already there" in (two_web[1].reason or "")


def test_unavailable_hosts_are_named_in_the_reason() -> None:
    placements = plan(
        [guest("a")],
        [],
        {"lab2": "in maintenance (bios)", "lab3": "its worker is not alive"},
        ESTIMATE,
    )
    assert placements[0].destination is None
    assert placements[0].reason == (
        "no destination (lab2: in maintenance (bios); lab3: its worker is not alive)"
    )
    assert plan([guest("a")], [], {}, ESTIMATE)[0].reason == (
        "no destination (no other host in the registry)"
    )


def test_inactive_domains_need_no_memory_and_go_last() -> None:
    placements = plan(
        [guest("off", 4096, active=False), guest("on", 64)], [Candidate("h", 100)], {}, ESTIMATE
    )
    assert [p.domain for p in placements] == ["on", "off"]
    assert where(placements) == {"on": "h", "off": "h"}
    assert placements[1].estimate_s == OFFLINE_ESTIMATE_S


def test_a_host_without_tls_certificates_takes_only_the_shut_off_guests_of_a_tls_drain() -> None:
    """Probe: a --tls drain with --include-inactive left every shut-off guest behind for the
    hosts' missing certificates; an offline move sends no memory and takes no TLS."""
    lab2 = Candidate("lab2", 4096, tls_refusal="no QEMU migration TLS certificates")
    placements = plan([guest("on"), guest("off", active=False)], [lab2], {}, ESTIMATE)
    assert where(placements) == {"on": None, "off": "lab2"}
    assert placements[0].reason == "no destination (lab2: no QEMU migration TLS certificates)"


@given(
    st.lists(st.integers(min_value=1, max_value=512), min_size=0, max_size=12),
    st.lists(st.integers(min_value=0, max_value=2048), min_size=1, max_size=4),
)
def test_never_overcommits_and_is_deterministic(sizes: list[int], rooms: list[int]) -> None:
    guests = [guest(f"g{i}", mib) for i, mib in enumerate(sizes)]

    def hosts() -> list[Candidate]:
        return [Candidate(f"h{i}", room) for i, room in enumerate(rooms)]

    first = plan(guests, hosts(), {}, ESTIMATE)
    assert first == plan(guests, hosts(), {}, ESTIMATE)
    used = Counter[str]()
    for p in first:
        if p.destination is not None:
            used[p.destination] += p.memory_mib
        else:
            # Unplaced only when no host had the room left at its turn.
            assert p.reason and "needs" in p.reason
    for i, room in enumerate(rooms):
        assert used[f"h{i}"] <= room


def test_children_carry_the_completion_timeout_only_when_they_run() -> None:
    """A live child gets the evacuation's completion timeout; an offline one (a definition,
    nothing to converge) would be refused with it, so it never gets one."""
    when = datetime.now(UTC)
    ev = Evacuation(
        id="0123456789ab",
        spec=EvacuationSpec(
            host="kvm1", completion_timeout_s=120, timeout_action=TimeoutAction.ABORT
        ),
        state=EvacuationState.RUNNING,
        origin="cli",
        created=when,
        updated=when,
    )

    def placed(active: bool) -> Placement:
        return Placement(
            domain="web01",
            uuid="u",
            memory_mib=64,
            active=active,
            persistent=True,
            destination="kvm2",
        )

    live = child_spec(ev, placed(True))
    assert (live.completion_timeout_s, live.on_timeout) == (120, TimeoutAction.ABORT)
    offline = child_spec(ev, placed(False))
    assert offline.offline and offline.on_timeout is None


def test_a_reason_names_ten_hosts_and_counts_the_rest() -> None:
    hosts = [Candidate(f"h{i:02d}", 10) for i in range(12)]
    (placement,) = plan([guest("big", 64)], hosts, {"down": "its worker is not alive"}, ESTIMATE)
    assert placement.destination is None and placement.reason is not None
    assert placement.reason.count("MiB free, needs 64 MiB") == 10
    assert placement.reason.endswith("h09: 10 MiB free, needs 64 MiB; and 3 more hosts)")
