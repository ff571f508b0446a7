"""What the lab records about itself (state.json): its hosts, pids and Redis URLs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from config.redis_acl import write_private
from lab.layout import LabLayout
from lab.linux_domain import LinuxGuest
from lab.proc import LabError

# How long a worker (or Redis, or a worker's death) may take to show.
WORKER_START_TIMEOUT = 60.0


@dataclass
class HostState:
    name: str
    address: str
    netns: str
    operator_uri: str
    peer_uri: str
    holder_pid: int = 0
    libvirtd_pid: int = 0
    worker_pid: int = 0
    worker_log: str = ""


@dataclass
class LabState:
    """What `down`, `status` and the fault helpers need; it holds every role's Redis URL
    (with its password), so it is written 0600 in the 0700 lab directory."""

    lab_id: int
    config: str
    redis_url: str  # the producer's, as in drover.toml
    redis_pid: int = 0
    tls: bool = False
    hosts: dict[str, HostState] = field(default_factory=dict)
    # Every role's URL (config/redis_acl.py): workers get theirs in their environment.
    role_urls: dict[str, str] = field(default_factory=dict)
    # `lab up --sentinel` (lab/sentinel.py): each Redis node's pid by port (the primary's
    # is `redis_pid` too until a failover), the sentinels' pids, and the password of the
    # sentinels' own user (the fault helpers ask them which node is the master).
    node_pids: dict[str, int] = field(default_factory=dict)
    sentinel_pids: list[int] = field(default_factory=list)
    sentinel_password: str = ""
    # `lab up --linux-guests/--local-linux-guests` (lab/linux_lab.py).
    linux_guests: list[LinuxGuest] = field(default_factory=list)

    def save(self, lab: LabLayout) -> None:
        write_private(lab.state_path, json.dumps(asdict(self), indent=2))

    def url(self, role: str) -> str:
        return self.role_urls.get(role, self.redis_url)

    @classmethod
    def load(cls, lab: LabLayout) -> LabState | None:
        try:
            raw = json.loads(lab.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        hosts = {k: HostState(**v) for k, v in raw.pop("hosts").items()}
        linux = [LinuxGuest(**g) for g in raw.pop("linux_guests", [])]
        return cls(**raw, hosts=hosts, linux_guests=linux)


def loaded() -> tuple[LabLayout, LabState]:
    """The lab that is up (LabError when none is)."""
    lab = LabLayout.from_env()
    state = LabState.load(lab)
    if state is None:
        raise LabError("no lab is up: run `drover lab up` first")
    return lab, state
