"""drover's settings: one TOML file plus a few environment overrides.

Everything tunable lives here so that no module hides its own magic numbers. Producers and
workers load the same file; workers re-read it when it changes on disk so that an operator can
adjust a host's limits without restarting the fleet.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from threading import Lock
from typing import Any, NamedTuple

from pydantic import ValidationError

from config.addresses import MAX_SHOWN_CHARS, shown
from config.redis_sentinel import check_any_redis_url

# Re-exported: the model lives in config/settings_model.py.
from config.settings_model import DEFAULT_REDIS_URL as DEFAULT_REDIS_URL
from config.settings_model import URI_PARAMS_KEY, URI_SCHEMES_KEY
from config.settings_model import Cluster as Cluster
from config.settings_model import ConfigError as ConfigError
from config.settings_model import FaultInjection as FaultInjection
from config.settings_model import Host as Host
from config.settings_model import HostLimits as HostLimits
from config.settings_model import Security as Security
from config.settings_model import Settings as Settings
from config.settings_model import Tunables as Tunables
from config.user_files import UserFileError, read_text

CONFIG_ENV = "DROVER_CONFIG"
REDIS_URL_ENV = "DROVER_REDIS_URL"
DEFAULT_CONFIG_PATHS = (Path("drover.toml"), Path("/etc/drover/drover.toml"))


def _config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The file to read: `explicit`, else $DROVER_CONFIG, else the first default that exists.

    An empty path given or set is refused, not skipped: falling through to another file
    would run with a registry the operator did not name.
    """
    if explicit is not None:
        if not os.fspath(explicit):
            raise ConfigError("the config file path is empty")
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env is not None:
        if not env:
            raise ConfigError(f"${CONFIG_ENV} is set but empty: name a config file or unset it")
        return Path(env)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"].endswith(("_type", "_parsing")):  # say what the file has instead
        found = err["input"]
        text = shown(found) if isinstance(found, str) else repr(found)[:MAX_SHOWN_CHARS]
        message = f"{message}, not {text}"
    return f"{where}: {message}"


def _as_json(raw: dict[str, Any], where: str) -> str:
    """The file's values as JSON, so that they are validated strictly as JSON is: a value of
    the wrong TOML type (`"yes"` or `1` for a switch, `"700"` or `1.5` for a count) is an
    error, not read as something the operator did not write, while strings still name
    paths, enums and addresses. A TOML date or time is no setting's type."""

    def encode(value: object) -> object:
        if isinstance(value, (set, frozenset)):  # the allowlists, already checked
            return sorted(value)
        raise ConfigError(f"config {where}: {value} is a TOML date or time; no setting takes one")

    return json.dumps(raw, default=encode)


def _allowlists(raw: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Pop the operator's URI allowlists off the top level (validation context for Host)."""
    context: dict[str, frozenset[str]] = {}
    for key in (URI_SCHEMES_KEY, URI_PARAMS_KEY):
        if key not in raw:
            continue
        value = raw.pop(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} must be a list of names")
        context[key] = frozenset(value)
    return context


def _normalise_hosts(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept `[hosts.NAME]` tables; the table key is the host's name."""
    hosts = raw.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError("'hosts' must be a table of [hosts.NAME] sections")
    out: dict[str, Any] = {}
    for key, body in hosts.items():
        if not isinstance(body, dict):
            raise ConfigError(f"hosts.{key} must be a table")
        if "name" in body and body["name"] != key:
            raise ConfigError(f"hosts.{key} has name {body['name']!r}; the two must match")
        out[key] = {**body, "name": key}
    return {**raw, "hosts": out}


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from `path`, $DROVER_CONFIG, ./drover.toml or /etc/drover/drover.toml.

    With no file at all the defaults apply (an empty registry), which is enough for
    `celery -A config inspect` against a local Redis.
    """
    cfg_path = _config_path(path)
    raw: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            raw = tomllib.loads(read_text(cfg_path))
        except UserFileError as exc:  # missing, unreadable, a directory or FIFO, not UTF-8
            raise ConfigError(f"config file {cfg_path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from None
        raw = _normalise_hosts(raw)
        raw["source"] = str(cfg_path)
    allowlists = _allowlists(raw)
    raw.update(allowlists)
    if os.environ.get(REDIS_URL_ENV):
        raw["redis_url"] = os.environ[REDIS_URL_ENV]
    where = raw.get("source", "<defaults>")
    try:
        settings = Settings.model_validate_json(
            _as_json(raw, where), strict=True, context=allowlists
        )
    except ValidationError as exc:
        raise ConfigError(f"config {where}: {_first_error(exc)}") from None
    try:
        check_any_redis_url(settings.redis_url, settings.security.insecure)
    except ValueError as exc:
        origin = (
            f"${REDIS_URL_ENV}" if os.environ.get(REDIS_URL_ENV) else f"config {settings.source}"
        )
        raise ConfigError(f"{origin}: {exc}") from None
    return settings


# What tells a config file's versions apart: modification time, size and inode. The time
# alone is not enough: a file rewritten in place is first truncated, then written, both
# possibly within one tick of the filesystem's clock, and a reload between the two would
# otherwise be the last one; a file replaced by a rename is a new inode.
class FileStamp(NamedTuple):
    mtime_ns: int
    size: int
    inode: int


def _file_stamp(path: Path | None) -> FileStamp | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


class _Cache:
    """Settings loaded once per process and reloaded when the file changes.

    A reload that fails (a typo saved mid-edit, a file half-copied) keeps the last good
    settings: a worker's heartbeat, lease holding and recovery must not stop because an
    operator's editor wrote a bad file, and its in-flight migrations must keep their policy.
    So does a file found empty once good settings were loaded: it is valid TOML (the
    defaults, no hosts), and it is what a file being rewritten in place looks like between
    its truncation and its write. The problem is kept (`problem()`) for the worker to report
    loudly until the file is fixed. A process that never loaded good settings has nothing to
    fall back on and raises.
    """

    def __init__(self) -> None:
        self._lock = Lock()
        self._settings: Settings | None = None
        self._stamp: FileStamp | None = None
        self._problem: str | None = None

    def get(self) -> Settings:
        path = _config_path(None)
        stamp = _file_stamp(path)
        with self._lock:
            if self._settings is None or stamp != self._stamp:
                try:
                    if self._settings is not None and stamp is not None and stamp.size == 0:
                        raise ConfigError(f"config file {path} is empty (being written?)")
                    fresh = load_settings()
                except ConfigError as exc:
                    if self._settings is None:
                        raise
                    self._stamp = stamp  # tried once per change of the file, not per call
                    self._problem = str(exc)
                    return self._settings
                self._settings, self._stamp, self._problem = fresh, stamp, None
            return self._settings

    def problem(self) -> str | None:
        with self._lock:
            return self._problem


_cache = _Cache()


def current() -> Settings:
    """The process-wide settings, fresh if the config file changed since the last call."""
    return _cache.get()


def config_problem() -> str | None:
    """Why the config file on disk was not loaded (the last good settings are in use), or
    None when the settings in use are the file's."""
    current()  # notice a change made since the last call
    return _cache.problem()
