"""`drover redis-acl`: the ACL file of drover's Redis, one user per role (config/redis_acl.py).

Passwords come from the environment or from a file, never from the command line, where `ps`
and the shell's history would keep them. The file holds their SHA-256 only.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated

import typer

from producer.cli_common import EXIT_USAGE, fail, guarded, out

PASSWORDS_FILE_HELP = (
    "NAME=VALUE lines (docker compose's .env works), mode 0600 or stricter; "
    "without it, the same names from the environment"
)
# Group or others may read, write or run it: a password file must be its owner's alone.
SHARED_MODE_BITS = 0o077
_INLINE_COMMENT = re.compile(r"\s+#.*\Z")


def register(app: typer.Typer) -> None:
    """Add this module's command to the `drover` CLI."""
    app.command("redis-acl")(redis_acl)


def redis_acl(
    # str, not Path: Path("") is ".", and an empty path must be told apart to be refused.
    passwords_file: Annotated[
        str | None, typer.Option("--passwords-file", help=PASSWORDS_FILE_HELP)
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="write the ACL file here (mode 0600), not stdout"),
    ] = None,
    db: Annotated[
        int | None,
        typer.Option("--db", min=0, max=15, help="Redis database (default: redis_url's)"),
    ] = None,
    remote_control: Annotated[
        bool | None,
        typer.Option(
            "--remote-control/--no-remote-control",
            help="grant Celery's pidbox (default: what the fleet's Celery config says)",
        ),
    ] = None,
) -> None:
    """Print Redis's ACL file for drover's roles: worker, producer, flower, beat.

    Each role's password is DROVER_REDIS_<ROLE>_PASSWORD (and, while rotating it,
    DROVER_REDIS_<ROLE>_PASSWORD_PREVIOUS); docs/redis-acl.md.
    """

    if output == "":
        fail("--output: the path is empty", EXIT_USAGE)

    def go() -> None:
        from config.redis_acl import BrokerNames, render_acl
        from config.settings import load_settings

        values = (
            read_passwords_file(passwords_file) if passwords_file is not None else dict(os.environ)
        )
        current, previous = role_passwords(values)
        names = BrokerNames.from_settings(load_settings(), db=db, remote_control=remote_control)
        text = render_acl(current, names, previous=previous)
        if output is None:
            out.file.write(text)
            return
        from config.redis_acl import write_private

        try:
            write_private(Path(output), text)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")

    guarded(go)


def role_passwords(values: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each role's password, and its previous one where set, from NAME=VALUE pairs."""
    from config.redis_acl import PASSWORD_ENV, PREVIOUS_PASSWORD_ENV, ROLES
    from config.settings import ConfigError

    current, previous = {}, {}
    for role in ROLES:
        name = PASSWORD_ENV.format(role.upper())
        if not values.get(name):
            raise ConfigError(f"no password for role {role}: set {name}")
        current[role] = values[name]
        old = values.get(PREVIOUS_PASSWORD_ENV.format(role.upper()))
        if old:
            previous[role] = old
    return current, previous


def read_passwords_file(path: str) -> dict[str, str]:
    """NAME=VALUE lines (blank lines and # comments skipped, one level of quotes removed);
    ConfigError, one line, for a path that is empty or no regular file (a FIFO would block),
    a file others may read, text that is not UTF-8, a line that is not NAME=VALUE, or a name
    given twice (which value was meant cannot be known; taking the last would hide it)."""
    from config.settings import ConfigError
    from config.user_files import UserFileError, read_text, regular_file

    where = f"--passwords-file {path}" if path else "--passwords-file"
    try:
        mode = stat.S_IMODE(regular_file(path).st_mode)
        if mode & SHARED_MODE_BITS:
            raise ConfigError(f"{path} is mode {mode:04o}; it holds passwords: chmod 600 {path}")
        text = read_text(path)
    except UserFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.removeprefix("export ").partition("=")
        if not equals or not name.strip().isidentifier():
            raise ConfigError(f"{path}:{number}: not a NAME=VALUE line")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:  # as Compose reads .env: a comment after an unquoted value follows a space
            value = _INLINE_COMMENT.sub("", value)
        name = name.strip()
        if name in first_line:
            raise ConfigError(
                f"{path}:{number}: {name} is given twice (first on line "
                f"{first_line[name]}); keep one"
            )
        first_line[name] = number
        values[name] = value
    return values
