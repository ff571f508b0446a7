"""`drover flower`: Flower on the fleet's broker.

It runs Flower in this process on the app `make_app` builds from the config file, so Flower
signs its inspect requests like any drover process when `[security] signing` is on (workers
obey only signed control messages) and reads the workers' events, which stay JSON. Several
defaults differ from Flower's, because a worker runs as root beside libvirtd:

- Flower listens on the loopback address unless told otherwise, and is read-only unless
  `--allow-control` is given (its shutdown, revoke, pool and consumer buttons would bypass
  drover's own abort and recovery; a consumer added to a worker would point it at another
  host's phases);
- basic auth comes from DROVER_FLOWER_AUTH or `--auth-file` (mode 0600), never from the
  command line, and reaches Flower as an option set in this process: no argv shows it, here
  or in a child. Flower's own FLOWER_* variables are refused, so that nothing from the
  environment overrides these choices (FLOWER_UNAUTHENTICATED_API would open the API);
- a request whose Host header is not an allowed name gets 403 before any handler runs
  (producer/flower_guard.py): loopback names, `--allowed-host` names, the listening IP;
- no `flowerconfig.py` from the working directory is executed (Flower's `--conf` default).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from typing import Annotated

import typer

from config.addresses import MAX_PORT
from config.user_files import UserFileError, read_text, regular_file
from producer.cli_common import EXIT_USAGE, fail, guarded

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
AUTH_ENV = "DROVER_FLOWER_AUTH"
FLOWER_ENV_PREFIX = "FLOWER_"
LOOPBACK_NAMES = frozenset({"localhost"})
# Group or others may read, write or run it: a credentials file must be its owner's alone.
SHARED_MODE_BITS = 0o077
AUTH_FORM = "USER:PASSWORD[,USER:PASSWORD...]"
BASIC_AUTH_REFUSED = (
    f"--basic-auth would show the password to `ps`: set {AUTH_ENV} or use --auth-file PATH"
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    app.command()(flower)


def flower(
    port: Annotated[
        int, typer.Option("--port", min=1, max=MAX_PORT, help="port of the web UI and API")
    ] = DEFAULT_PORT,
    address: Annotated[
        str, typer.Option("--address", help="address to listen on (loopback by default)")
    ] = DEFAULT_ADDRESS,
    # Files as str, not Path: Path("") is ".", and an empty path must be told apart to be refused.
    auth_file: Annotated[
        str | None,
        typer.Option(
            "--auth-file",
            help=f"basic auth for the UI and API: {AUTH_FORM}, one or more lines, mode 0600 "
            f"(or set {AUTH_ENV})",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="a name clients reach Flower by (Host header), besides the loopback names; "
            "repeat for more",
        ),
    ] = None,
    certfile: Annotated[
        str | None, typer.Option("--certfile", help="serve HTTPS with this certificate (PEM)")
    ] = None,
    keyfile: Annotated[
        str | None, typer.Option("--keyfile", help="the certificate's private key (PEM)")
    ] = None,
    ca_certs: Annotated[
        str | None,
        typer.Option("--ca-certs", help="with HTTPS: require client certificates of this CA"),
    ] = None,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only/--allow-control",
            help="read-only (default), or allow Flower's worker and task controls",
        ),
    ] = True,
    basic_auth: Annotated[str | None, typer.Option("--basic-auth", hidden=True)] = None,
) -> None:
    """Run Flower (web UI and HTTP API) on the fleet's broker: workers, host queues, tasks."""
    if basic_auth is not None:
        fail(BASIC_AUTH_REFUSED, EXIT_USAGE)
    problem = _environment_problem(os.environ)
    if problem is not None:
        fail(problem, EXIT_USAGE)
    credentials, problem = _credentials(auth_file, os.environ.get(AUTH_ENV))
    problem = (
        problem
        or _auth_problem(credentials)
        or _exposure_problem(address, credentials)
        or _hosts_problem(allowed_host or [])
        or _tls_problem(certfile, keyfile, ca_certs)
    )
    if problem is not None:
        fail(problem, EXIT_USAGE)

    def go() -> None:
        from config.settings import load_settings
        from producer.flower_run import check_redis, flower_app, run_flower

        settings = load_settings()
        check_redis(settings)
        # No periodic enable_events broadcast: workers send events from the start and obey
        # no remote control (docs/security.md).
        argv = [
            f"--port={port}",
            f"--address={address}",
            f"--read_only={read_only}",
            "--enable_events=False",
        ]
        if certfile is not None and keyfile is not None:
            argv += [f"--certfile={certfile}", f"--keyfile={keyfile}"]
            if ca_certs is not None:
                argv.append(f"--ca_certs={ca_certs}")
        try:
            run_flower(
                flower_app(settings),
                argv,
                basic_auth=credentials.split(",") if credentials else [],
                allowed=_allowed(allowed_host or [], address),
            )
        except OSError as exc:  # the port is taken, the address is not ours, ...
            fail(f"Flower cannot listen on {address}:{port}: {exc.strerror or exc}")

    guarded(go)


def _allowed(names: list[str], address: str) -> frozenset[str]:
    from producer.flower_guard import allowed_hosts

    return allowed_hosts(names, address)


def _environment_problem(environ: Mapping[str, str]) -> str | None:
    """Flower would read any FLOWER_* variable as an option and override drover's."""
    names = sorted(n for n in environ if n.startswith(FLOWER_ENV_PREFIX))
    if not names:
        return None
    return (
        f"{names[0]} is set: drover flower takes no Flower options from the environment "
        f"(credentials: {AUTH_ENV} or --auth-file)"
    )


def _credentials(auth_file: str | None, from_env: str | None) -> tuple[str | None, str | None]:
    """(credentials, problem): from the file or the environment, exactly one of them.

    The file must be a regular one, its owner's alone, before it is read: a FIFO would block.
    """
    if auth_file is not None and from_env:
        return None, f"credentials from {AUTH_ENV} and --auth-file: give one"
    if auth_file is None:
        return from_env, None
    try:
        mode = stat.S_IMODE(regular_file(auth_file).st_mode)
        if mode & SHARED_MODE_BITS:
            return None, (
                f"--auth-file {auth_file} is mode {mode:04o}; it holds passwords: "
                f"chmod 600 {auth_file}"
            )
        text = read_text(auth_file)
    except UserFileError as exc:
        return None, f"{_named('--auth-file', auth_file)}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return ",".join(lines), None


def _auth_problem(credentials: str | None) -> str | None:
    """Why the credentials would not work in Flower (which splits them on commas)."""
    if credentials is None:
        return None
    for credential in credentials.split(","):
        user, colon, password = credential.partition(":")
        if not (user and colon and password):
            return f"basic auth ({AUTH_ENV} or --auth-file) must be {AUTH_FORM}"
    return None


def _exposure_problem(address: str, credentials: str | None) -> str | None:
    """Refuse to show the fleet to a network without a password."""
    if credentials or _is_loopback(address):
        return None
    return (
        f"--address {address or '(all)'} would show the fleet to the network without a "
        f"password: set {AUTH_ENV}=USER:PASSWORD or use --auth-file PATH"
    )


def _hosts_problem(names: list[str]) -> str | None:
    from config.addresses import check_address

    for name in names:
        try:
            check_address(name)
        except ValueError:
            return f"--allowed-host {name!r} is not a host name or IP address (no port)"
    return None


def _named(option: str, path: str) -> str:
    """The option and its file, for a message (an empty path shows as the option alone)."""
    return f"{option} {path}" if path else option


def _tls_problem(certfile: str | None, keyfile: str | None, ca_certs: str | None) -> str | None:
    """Both halves of the server's pair, regular files and readable; a CA only with them.

    Flower reads them only once it serves: a directory or a FIFO would fail or block there.
    """
    if (certfile is None) != (keyfile is None):
        return "HTTPS needs both --certfile and --keyfile"
    if ca_certs is not None and certfile is None:
        return "--ca-certs needs --certfile and --keyfile (it checks HTTPS clients)"
    for option, path in (
        ("--certfile", certfile),
        ("--keyfile", keyfile),
        ("--ca-certs", ca_certs),
    ):
        if path is None:
            continue
        try:
            regular_file(path)
        except UserFileError as exc:
            return f"{_named(option, path)}: {exc}"
        if not os.access(path, os.R_OK):
            return f"{option} {path} is not a readable file"
    return None


def _is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name, or empty (every interface)
        return False
