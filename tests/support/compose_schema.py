"""The Compose Specification JSON schema, fetched once from the npm registry and cached.

The schema is compose-spec/compose-spec's ``schema/compose-spec.json`` (draft-07,
``"$id": "compose_spec.json"``), the one ``docker compose`` itself validates against.
CI and the project's machines reach package registries only, so it comes from a
pinned package: ``dclint`` (a Docker Compose linter on the npm registry) ships the
upstream schema unchanged as ``package/schemas/compose.schema.json``. It is fetched with
``npm pack`` (Node's npm is on every machine of this project), the tarball is checked
against the registry's pinned sha512 integrity, and only the schema is kept, under
``<repo>/.cache/compose-spec/`` (git-ignored). The fetch happens only when that file is
missing, so once per machine.

PyPI has no current copy: the last Python ``docker-compose`` (1.29.2, 2021) ships a
draft 2019-09 ``compose/config/compose_spec.json`` that predates e.g. the top-level
``name`` key, and so rejects a valid modern file.

To prefetch (from a Makefile or ``.ci/run``): ``python -m tests.support.compose_schema``.
To move to a newer schema: bump ``PACKAGE_VERSION`` and take ``PACKAGE_INTEGRITY`` from
``npm view dclint@VERSION dist.integrity``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "dclint"
PACKAGE_VERSION = "3.1.0"
PACKAGE_INTEGRITY = (
    "sha512-afTGdzRFUXK4yCpIiEW/LOR+9TOMEDhNldDp56VCWzn7JDmD451PcUi640GGlMHg"
    "bHKJ10rDBm4PtpcBbjqlXw=="
)
SCHEMA_MEMBER = "package/schemas/compose.schema.json"

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "compose-spec"
CACHED_SCHEMA = CACHE_DIR / f"{PACKAGE}-{PACKAGE_VERSION}.compose-spec.json"


def compose_schema() -> dict[str, Any]:
    """Return the Compose Specification schema, fetching it on first use only."""
    if not CACHED_SCHEMA.is_file():
        _store(CACHED_SCHEMA, _extract(_fetch()))
    schema: dict[str, Any] = json.loads(CACHED_SCHEMA.read_text(encoding="utf-8"))
    return schema


def _fetch() -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm is not on PATH: it fetches the Compose schema ({PACKAGE}@{PACKAGE_VERSION} "
            "from the npm registry). Install Node.js's npm, or put the schema at "
            f"{CACHED_SCHEMA}."
        )
    with tempfile.TemporaryDirectory(prefix="compose-spec-") as tmp:
        cmd = [npm, "pack", f"{PACKAGE}@{PACKAGE_VERSION}", "--ignore-scripts"]
        cmd += ["--pack-destination", tmp]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        tarball = Path(tmp) / f"{PACKAGE}-{PACKAGE_VERSION}.tgz"
        if done.returncode != 0 or not tarball.is_file():
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
            )
        data = tarball.read_bytes()
    algorithm, _, expected = PACKAGE_INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise RuntimeError(
            f"{tarball.name}: {algorithm} {actual} is not the pinned integrity {expected}"
        )
    return data


def _extract(tarball: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tgz:
        member = tgz.extractfile(SCHEMA_MEMBER)
        if member is None:
            raise RuntimeError(f"{SCHEMA_MEMBER} is not a regular file in the tarball")
        return member.read()


def _store(path: Path, content: bytes) -> None:
    json.loads(content)  # refuse to cache something that is not JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


if __name__ == "__main__":
    loaded = compose_schema()
    print(f"{CACHED_SCHEMA}: {loaded['title']}, {loaded['$schema']}, $id {loaded['$id']}")
