"""The lab's shared storage: a GlusterFS volume every lab host mounts at the same path.

Why GlusterFS: libvirt refuses to migrate a guest whose disk is on a local file system
("Migration without shared storage is unsafe", VIR_ERR_MIGRATE_UNSAFE), even with cache='none'
(measured with libvirt 9.0 here). Its virFileIsSharedFS accepts NFS, GFS2, OCFS2, AFS, SMB/CIFS,
Ceph, GPFS, and ACFS by file-system magic (BeeGFS came after 9.0), and of FUSE mounts only
`fuse.glusterfs` and `fuse.quobyte`. This machine's kernel has no NFS or CIFS client, but it has
FUSE, and Debian ships GlusterFS: so the lab runs a real one-brick Gluster volume (glusterd and
its brick in the root namespace, on the lab's root address) and each host mounts it with its own
FUSE client inside its own namespaces, as a real host mounts a shared export. libvirt then sees
a genuinely shared file system; drover never passes VIR_MIGRATE_UNSAFE for it.

glusterd's bricks and clients assume its port 24007: each lab binds it on its own root address,
and gives its bricks a port range of their own. Every process is found again by pid file
(`stop`), and the hosts' FUSE clients live in the hosts' network namespaces.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from lab.layout import LabLayout
from lab.libvirtd import in_host
from lab.proc import alive, kill, pid_from_file, run, spawn, wait_until

GLUSTERD_PORT = 24007
BRICK_BASE_PORT = 50000
BRICK_PORTS_PER_LAB = 50
START_TIMEOUT_S = 30.0
GLUSTER_CLI_TIMEOUT_S = 60.0
BRICK_SOCKET_DIR = "/var/run/gluster/"


def _dir(lab: LabLayout) -> Path:
    return lab.dir / "gluster"


def volume_name(lab: LabLayout) -> str:
    return f"{lab.tag}shared"


def _socket(lab: LabLayout) -> Path:
    return _dir(lab) / "run" / "glusterd.socket"


def glusterd_vol(lab: LabLayout) -> str:
    base = BRICK_BASE_PORT + BRICK_PORTS_PER_LAB * lab.lab_id
    d = _dir(lab)
    return "\n".join(
        [
            "volume management",
            "    type mgmt/glusterd",
            f"    option working-directory {d / 'state'}",
            f"    option run-directory {d / 'run'}",
            f"    option glusterd-sockfile {_socket(lab)}",
            "    option transport-type socket",
            f"    option transport.socket.bind-address {lab.root_address}",
            f"    option transport.socket.listen-port {GLUSTERD_PORT}",
            "    option ping-timeout 0",
            "    option event-threads 1",
            f"    option base-port {base}",
            f"    option max-port {base + BRICK_PORTS_PER_LAB - 1}",
            "end-volume",
            "",
        ]
    )


def _gluster(lab: LabLayout, *args: str) -> str:
    return run(
        [
            "gluster",
            "--mode=script",
            f"--glusterd-sock={_socket(lab)}",
            f"--log-file={_dir(lab) / 'log' / 'cli.log'}",
            *args,
        ],
        timeout=GLUSTER_CLI_TIMEOUT_S,
    )


def start(lab: LabLayout) -> None:
    """glusterd, a one-brick volume, started (the brick under the lab's directory)."""
    d = _dir(lab)
    for sub in ("state", "run", "log", "brick"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "glusterd.vol").write_text(glusterd_vol(lab))
    spawn(
        [
            *("glusterd", "-N", "-f", str(d / "glusterd.vol")),
            *("-p", str(d / "glusterd.pid"), "-l", str(d / "log" / "glusterd.log")),
        ],
        d / "log" / "glusterd.out",
    )
    wait_until(_socket(lab).exists, START_TIMEOUT_S, "glusterd's socket")
    vol = volume_name(lab)
    _gluster(lab, "volume", "create", vol, f"{lab.root_address}:{d / 'brick'}", "force")
    _gluster(lab, "volume", "start", vol)


def mount(lab: LabLayout, holder_pid: int) -> None:
    """Mount the volume at lab.shared_dir inside one host's namespaces (its own client)."""
    lab.shared_dir.mkdir(parents=True, exist_ok=True)
    log = _dir(lab) / "log" / f"client-{holder_pid}.log"
    run(
        [
            *in_host(holder_pid),
            *("glusterfs", f"--volfile-server={lab.root_address}"),
            *(f"--volfile-id={volume_name(lab)}", f"--log-file={log}", str(lab.shared_dir)),
        ],
        timeout=START_TIMEOUT_S,
    )
    wait_until(
        lambda: (
            "fuse.glusterfs"
            in run([*in_host(holder_pid), "findmnt", str(lab.shared_dir)], check=False)
        ),
        START_TIMEOUT_S,
        "the shared storage mount",
    )


def _pids(lab: LabLayout) -> list[int]:
    """glusterd and its brick processes (root namespace), from their pid files."""
    d = _dir(lab)
    files = [d / "glusterd.pid", *sorted((d / "run" / "vols").glob("*/*.pid"))]
    return [p for p in (pid_from_file(f) for f in files) if p and alive(p)]


def _brick_sockets(pids: list[int]) -> list[Path]:
    """The UNIX sockets glusterd gives its bricks (`-S`, always under /var/run/gluster)."""
    sockets = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(args):
            if flag == b"-S" and value.startswith(BRICK_SOCKET_DIR.encode()):
                sockets.append(Path(value.decode()))
    return sockets


def stop(lab: LabLayout) -> bool:
    """Stop this lab's glusterd and bricks and remove their sockets; True if any ran."""
    pids = _pids(lab)
    sockets = _brick_sockets(pids)
    kill(pids)
    for s in sockets:
        s.unlink(missing_ok=True)
    return bool(pids)
