"""Names, addresses and paths of one local lab, all derived from a lab id.

Deriving everything from one small number keeps `up` and `down` in agreement even when `up`
failed halfway and left no state file behind, and lets a second lab (tests) run beside a demo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LAB_DIR_ENV = "DROVER_LAB_DIR"
LAB_ID_ENV = "DROVER_LAB_ID"
DEFAULT_LAB_ROOT = Path("/var/tmp/drover-lab")
SUBNET_PREFIX = "10.213"
# The guests' own network (lab/guest_net.py): one L2 segment across the hosts, root at .254.
GUEST_SUBNET_PREFIX = "10.214"
# The bridge inside every host's namespace that guests' NICs join: one name on every host,
# so a domain's XML is valid on both ends of a migration.
HOST_GUEST_BRIDGE = "drvguest"
ROOT_HOST_OCTET = 254
REDIS_BASE_PORT = 6390
# `lab up --sentinel`: the replica's port, and three sentinels' from here (clear of the
# redis-sentinel package's own 26379, which a system service may hold).
REPLICA_BASE_PORT = 6600
SENTINEL_BASE_PORT = 26400
SENTINELS = 3
MAX_HOSTS = 8
MAX_LAB_ID = 200

# Inside each host's mount namespace these system directories are replaced by the host's own
# copy (the value: its folder under the host's directory). /etc/pki holds the host's TLS
# certificates where libvirt and QEMU look by default; it stays empty in a lab without --tls.
LIBVIRT_DIRS = {
    "/etc/libvirt": "etc",
    "/etc/pki": "pki",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}


@dataclass(frozen=True)
class HostLayout:
    index: int
    name: str
    tag: str  # the lab's (drv<id>): every link name starts with it
    netns: str
    veth_host: str
    veth_bridge: str
    address: str
    dir: Path

    def own_dir(self, system_dir: str) -> Path:
        """The host's private copy of a system directory, e.g. /run/libvirt -> <dir>/run."""
        return self.dir / LIBVIRT_DIRS[system_dir]

    @property
    def veth_guest_root(self) -> str:
        """The root namespace's end of the host's link into the guest network."""
        return f"{self.tag}g{self.index}"

    @property
    def veth_guest_host(self) -> str:
        return f"{self.tag}k{self.index}"

    @property
    def socket(self) -> Path:
        return self.own_dir("/run/libvirt") / "libvirt-sock"

    @property
    def operator_uri(self) -> str:
        """A URI that virsh in the root namespace can use to reach this host's libvirtd."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def peer_uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def tls_peer_uri(self) -> str:
        """The same libvirtd over TLS (port 16514); listening only in a lab up with --tls."""
        return f"qemu+tls://{self.address}/system"


@dataclass(frozen=True)
class LabLayout:
    lab_id: int
    dir: Path

    @classmethod
    def from_env(cls) -> LabLayout:
        lab_id = int(os.environ.get(LAB_ID_ENV, "0"))
        if not 0 <= lab_id <= MAX_LAB_ID:
            raise ValueError(f"{LAB_ID_ENV} must be between 0 and {MAX_LAB_ID}")
        default_dir = DEFAULT_LAB_ROOT if lab_id == 0 else Path(f"{DEFAULT_LAB_ROOT}-{lab_id}")
        return cls(lab_id=lab_id, dir=Path(os.environ.get(LAB_DIR_ENV, default_dir)))

    @property
    def tag(self) -> str:
        return f"drv{self.lab_id}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def subnet(self) -> str:
        return f"{SUBNET_PREFIX}.{self.lab_id}"

    @property
    def guest_bridge(self) -> str:
        """The root namespace's bridge of the guest network (it holds `guest_root_address`)."""
        return f"{self.tag}gbr"

    @property
    def guest_subnet(self) -> str:
        return f"{GUEST_SUBNET_PREFIX}.{self.lab_id}"

    @property
    def guest_root_address(self) -> str:
        return f"{self.guest_subnet}.{ROOT_HOST_OCTET}"

    @property
    def shared_dir(self) -> Path:
        """Storage every lab host sees at the same path (lab/shared_storage.py)."""
        return self.dir / "shared"

    @property
    def root_address(self) -> str:
        return f"{self.subnet}.{ROOT_HOST_OCTET}"

    @property
    def redis_port(self) -> int:
        return REDIS_BASE_PORT + self.lab_id

    @property
    def replica_port(self) -> int:
        return REPLICA_BASE_PORT + self.lab_id

    @property
    def sentinel_ports(self) -> list[int]:
        first = SENTINEL_BASE_PORT + SENTINELS * self.lab_id
        return [first + i for i in range(SENTINELS)]

    @property
    def replica_dir(self) -> Path:
        return self.dir / "redis-replica"

    def sentinel_dir(self, index: int) -> Path:
        return self.dir / f"sentinel-{index}"

    @property
    def config_path(self) -> Path:
        return self.dir / "drover.toml"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def redis_dir(self) -> Path:
        return self.dir / "redis"

    @property
    def guests_dir(self) -> Path:
        return self.dir / "guests"

    @property
    def ca_dir(self) -> Path:
        return self.dir / "ca"

    def host(self, index: int) -> HostLayout:
        name = f"lab{index}"
        return HostLayout(
            index=index,
            name=name,
            tag=self.tag,
            netns=f"{self.tag}-{name}",
            veth_host=f"{self.tag}h{index}",
            veth_bridge=f"{self.tag}b{index}",
            address=f"{self.subnet}.{index}",
            dir=self.dir / "hosts" / name,
        )

    def hosts(self, count: int) -> list[HostLayout]:
        return [self.host(i) for i in range(1, count + 1)]
