"""One lab host's libvirtd: its private directories, its config, and the daemon itself.

A host is a network namespace plus a private mount namespace in which the host's own
directories are bind-mounted over libvirt's system paths. A tiny holder process keeps that
mount namespace alive; libvirtd and the drover worker are started inside it with nsenter.
"""

from __future__ import annotations

import grp
import pwd
import uuid
from pathlib import Path

from lab.layout import LIBVIRT_DIRS, HostLayout, LabLayout
from lab.proc import LabError, alive, run, spawn, wait_until
from lab.tls import QEMU_CERT_DIR

MIGRATION_PORT_MIN = 49152
MIGRATION_PORT_MAX = 49215
HOLDER_START_TIMEOUT = 10.0
LIBVIRTD_START_TIMEOUT = 30.0
# Debian's libvirtd resolves this user before reading qemu.conf; without it the daemon dies.
QEMU_SYSTEM_USER = "libvirt-qemu"
# libvirtd's sockets (in libvirtd.conf's octal string form) and the host's run directory
# that holds them: root's alone, since the sockets ask for no credentials.
SOCKET_PERMS = "0700"
SOCKET_DIR_MODE = 0o700


def libvirtd_conf(lab: LabLayout, host: HostLayout, tls: bool = False) -> str:
    """With `tls`, libvirtd also listens on 16514, certificates at libvirt's default paths.

    Plain TCP stays on either way: TLS is a choice per peer URI and per job, not of the host.
    """
    host_uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{lab.tag}.{host.name}.drover.lab")
    tls_lines = ['auth_tls = "none"', "tls_no_verify_certificate = 0"] if tls else []
    return "\n".join(
        [
            "listen_tcp = 1",
            f"listen_tls = {int(tls)}",
            *tls_lines,
            f'listen_addr = "{host.address}"',
            'auth_tcp = "none"',
            # The UNIX sockets take no authentication: only their owner (root) may connect,
            # and their directory is root's alone too (`write_host_files`).
            'auth_unix_rw = "none"',
            'auth_unix_ro = "none"',
            f'unix_sock_rw_perms = "{SOCKET_PERMS}"',
            f'unix_sock_ro_perms = "{SOCKET_PERMS}"',
            f'unix_sock_admin_perms = "{SOCKET_PERMS}"',
            # Equal host UUIDs make libvirt refuse: "Attempt to migrate guest to the same host".
            f'host_uuid = "{host_uuid}"',
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
            "",
        ]
    )


def qemu_conf(host: HostLayout, tls: bool = False) -> str:
    """With `tls`, QEMU can encrypt migrations (VIR_MIGRATE_TLS) and demands a client cert.

    Without it the cert dir is left unset: libvirt refuses to start when an explicitly set
    default_tls_x509_cert_dir does not exist.
    """
    tls_lines = (
        [
            f'default_tls_x509_cert_dir = "{QEMU_CERT_DIR}"',
            f'migrate_tls_x509_cert_dir = "{QEMU_CERT_DIR}"',
            "migrate_tls_x509_verify = 1",
        ]
        if tls
        else []
    )
    return "\n".join(
        [
            'user = "root"',
            'group = "root"',
            "dynamic_ownership = 0",
            "remember_owner = 0",
            'security_driver = "none"',
            "cgroup_controllers = [ ]",
            "namespaces = [ ]",
            'stdio_handler = "file"',
            f'migration_address = "{host.address}"',
            # Without migration_host the destination advertises its hostname (127.0.0.1 here).
            f'migration_host = "{host.address}"',
            f"migration_port_min = {MIGRATION_PORT_MIN}",
            f"migration_port_max = {MIGRATION_PORT_MAX}",
            *tls_lines,
            "",
        ]
    )


def ensure_system_user() -> None:
    try:
        grp.getgrnam(QEMU_SYSTEM_USER)
    except KeyError:
        run(["groupadd", "--system", QEMU_SYSTEM_USER])
    try:
        pwd.getpwnam(QEMU_SYSTEM_USER)
    except KeyError:
        run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                QEMU_SYSTEM_USER,
                QEMU_SYSTEM_USER,
            ]
        )


def prepare_dirs(lab: LabLayout, host: HostLayout, tls: bool = False) -> None:
    for system_dir in LIBVIRT_DIRS:
        Path(system_dir).mkdir(parents=True, exist_ok=True)  # bind-mount targets
    write_host_files(lab, host, tls)


def write_host_files(lab: LabLayout, host: HostLayout, tls: bool = False) -> None:
    """The host's own copies of libvirt's directories and its two config files."""
    for system_dir in LIBVIRT_DIRS:
        host.own_dir(system_dir).mkdir(parents=True, exist_ok=True)
    host.own_dir("/run/libvirt").chmod(SOCKET_DIR_MODE)
    etc = host.own_dir("/etc/libvirt")
    (etc / "libvirtd.conf").write_text(libvirtd_conf(lab, host, tls))
    (etc / "qemu.conf").write_text(qemu_conf(host, tls))


def _holder_pidfile(host: HostLayout) -> Path:
    return host.dir / "holder.pid"


def start_holder(host: HostLayout) -> int:
    """Start the process that owns the host's mount namespace; return its pid."""
    pidfile = _holder_pidfile(host)
    pidfile.unlink(missing_ok=True)
    binds = " && ".join(f"mount --bind {host.own_dir(d)} {d}" for d in LIBVIRT_DIRS)
    script = f"{binds} && echo $$ > {pidfile} && exec sleep infinity"
    spawn(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ],
        host.dir / "holder.log",
    )
    wait_until(
        lambda: pidfile.exists() and pidfile.read_text().strip() != "",
        HOLDER_START_TIMEOUT,
        f"{host.name}'s namespace holder",
    )
    return int(pidfile.read_text())


def in_host(holder_pid: int) -> list[str]:
    """The command prefix that runs a program inside a host's network and mount namespaces."""
    return ["nsenter", "-t", str(holder_pid), "-m", "-n", "--"]


def start_libvirtd(host: HostLayout, holder_pid: int) -> int:
    """Start the host's libvirtd, wait until its socket answers, warm its QEMU probe; pid."""
    pidfile = host.own_dir("/run/libvirt") / "libvirtd.pid"
    run(
        [
            *in_host(holder_pid),
            "libvirtd",
            "-d",
            "--listen",
            "-f",
            "/etc/libvirt/libvirtd.conf",
            "-p",
            "/run/libvirt/libvirtd.pid",
        ]
    )
    wait_until(
        lambda: host.socket.exists() and pidfile.exists(),
        LIBVIRTD_START_TIMEOUT,
        f"{host.name}'s libvirtd socket",
    )
    pid = int(pidfile.read_text().strip())
    # The first capability probe costs seconds; pay it now rather than in the first migration.
    run(["virsh", "-c", host.operator_uri, "domcapabilities"], timeout=LIBVIRTD_START_TIMEOUT)
    if not alive(pid):
        raise LabError(f"{host.name}'s libvirtd exited; see {host.own_dir('/var/log/libvirt')}")
    return pid
