"""The Compose Specification JSON schema, fetched once from a package registry and cached.

The schema is compose-spec/compose-spec's ``schema/compose-spec.json`` (draft-07,
``"$id": "compose_spec.json"``), the one ``docker compose`` itself validates against.
This machine and CI reach package registries only, so it comes from a pinned package:

* ``npm`` (default): the npm package ``dclint`` (a Docker Compose linter) ships the
  current upstream schema unchanged as ``package/schemas/compose.schema.json``.
  Fetched with ``npm pack``; needs Node's npm on PATH (every machine of this project has it).
* ``pypi`` (fallback, opt-in): the last Python ``docker-compose`` release, 1.29.2 (2021),
  ships ``compose/config/compose_spec.json``: an older draft 2019-09 schema that lacks
  newer keys (``develop``, ``include``, ``models``, ...). Fetched with ``pip download``.

Choose with ``DROVER_COMPOSE_SCHEMA_SOURCE=npm|pypi``. There is no silent fallback: a
missing ``npm`` is an error that says so, so a test never quietly checks against the
older schema.

The archive is checked against a pinned digest, and only the extracted schema is kept
under ``<repo>/.cache/compose-spec/`` (git-ignored). It is fetched only when it is not
already there, so the network is touched once per machine. To prefetch, e.g. from a
Makefile or ``.ci/run``: ``python -m tests.support.compose_schema``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "compose-spec"
SOURCE_ENV = "DROVER_COMPOSE_SCHEMA_SOURCE"


@dataclass(frozen=True)
class Source:
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    archive: str  # file name the client writes
    digest: str  # "sha512-<base64>" (npm integrity) or "sha256:<hex>"
    member: str  # path of the schema inside the archive
    draft: str  # JSON Schema draft the schema declares

    @property
    def cached_path(self) -> Path:
        return CACHE_DIR / f"{self.registry}-{self.package}-{self.version}.json"


SOURCES: dict[str, Source] = {
    "npm": Source(
        registry="npm",
        package="dclint",
        version="3.1.0",
        archive="dclint-3.1.0.tgz",
        digest=(
            "sha512-afTGdzRFUXK4yCpIiEW/LOR+9TOMEDhNldDp56VCWzn7JDmD451PcUi640GGlMHg"
            "bHKJ10rDBm4PtpcBbjqlXw=="
        ),
        member="package/schemas/compose.schema.json",
        draft="draft-07",
    ),
    "pypi": Source(
        registry="pypi",
        package="docker-compose",
        version="1.29.2",
        archive="docker_compose-1.29.2-py2.py3-none-any.whl",
        digest="sha256:8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809",
        member="compose/config/compose_spec.json",
        draft="draft/2019-09",
    ),
}


def selected_source() -> Source:
    name = os.environ.get(SOURCE_ENV, "npm")
    try:
        return SOURCES[name]
    except KeyError:
        raise RuntimeError(f"{SOURCE_ENV}={name!r}: expected one of {sorted(SOURCES)}") from None


def compose_schema(source: Source | None = None) -> dict[str, Any]:
    """Return the Compose Specification schema, fetching it on first use only."""
    source = source or selected_source()
    path = source.cached_path
    if not path.is_file():
        _store(path, _fetch(source))
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def _fetch(source: Source) -> bytes:
    with tempfile.TemporaryDirectory(prefix="compose-spec-") as tmp:
        dest = Path(tmp)
        if source.registry == "npm":
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError(
                    f"npm is not on PATH: it fetches the Compose schema ({source.package}"
                    f"@{source.version}). Install Node's npm, or set {SOURCE_ENV}=pypi for "
                    "the older schema shipped by docker-compose 1.29.2."
                )
            cmd = [npm, "pack", f"{source.package}@{source.version}", "--ignore-scripts"]
            cmd += ["--pack-destination", str(dest)]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            cmd += ["--disable-pip-version-check", "--quiet", "--dest", str(dest)]
            cmd += [f"{source.package}=={source.version}"]
        done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
        archive = dest / source.archive
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(
                f"could not fetch {source.package} {source.version} from {source.registry} "
                f"({' '.join(cmd)}): exit {done.returncode}\n{done.stdout}{done.stderr}"
            )
        data = archive.read_bytes()
    _check_digest(source, data)
    return _extract(source, data)


def _check_digest(source: Source, data: bytes) -> None:
    algo, _, expected = source.digest.partition("-" if source.registry == "npm" else ":")
    digest = hashlib.new(algo, data).digest()
    actual = base64.b64encode(digest).decode() if source.registry == "npm" else digest.hex()
    if actual != expected:
        raise RuntimeError(
            f"{source.archive}: {algo} digest {actual} does not match the pinned {expected}"
        )


def _extract(source: Source, data: bytes) -> bytes:
    if source.archive.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            return wheel.read(source.member)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tgz:
        member = tgz.extractfile(source.member)
        if member is None:
            raise RuntimeError(f"{source.archive}: {source.member} is not a regular file")
        return member.read()


def _store(path: Path, content: bytes) -> None:
    json.loads(content)  # refuse to cache something that is not JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    chosen = selected_source()
    loaded = compose_schema(chosen)
    print(f"{chosen.cached_path}: {loaded.get('$schema')} {loaded.get('$id', '')}")
