"""What the fast path keeps per process (issue 17), and that it is given up when it must be.

- The `auth` serializer is registered once per signing identity: registering loads the
  private key (tens of milliseconds), which every publish did before. New key files at the
  same paths, or a registration made behind drover's back, register again.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.serialization import registry

from config.celery import make_app
from config.security import ensure_signing
from config.settings import Settings, load_settings
from lab.signing import make_certificate
from tests.support.registry import REGISTRY, signing_section


@pytest.fixture(autouse=True)
def _registry_restored() -> Iterator[None]:
    """kombu's serializer registry is process-wide: other tests in this process sign with
    their own fleet's key, registered before or after these."""
    saved = copy.copy(registry.__dict__)
    saved["_encoders"] = dict(registry._encoders)
    saved["_decoders"] = dict(registry._decoders)
    saved["_disabled_content_types"] = set(registry._disabled_content_types)
    yield
    registry.__dict__.update(saved)


def _fleet(keys: Path) -> Settings:
    (keys / "trusted").mkdir(parents=True, exist_ok=True)
    make_certificate(keys / "key.pem", keys / "cert.pem", "/CN=producer")
    shutil.copy(keys / "cert.pem", keys / "trusted" / "producer.pem")
    config = keys / "drover.toml"
    config.write_text(REGISTRY.format(url="redis://127.0.0.1:1/0") + signing_section(keys))
    return load_settings(config)


def _encoder() -> object:
    return registry._encoders["auth"].encoder


def test_signing_is_registered_once_per_identity(tmp_path: Path) -> None:
    settings = _fleet(tmp_path)
    app = make_app(settings)
    registered = _encoder()
    ensure_signing(app, settings)
    ensure_signing(app, settings)
    assert _encoder() is registered  # the key was not loaded again


def test_new_key_files_or_a_foreign_registration_register_again(tmp_path: Path) -> None:
    settings = _fleet(tmp_path)
    app = make_app(settings)
    first = _encoder()
    _fleet(tmp_path)  # a lab brought up again: new key and certificate at the same paths
    ensure_signing(app, settings)
    second = _encoder()
    assert second is not first
    app.setup_security(allowed_serializers=["json"])  # behind drover's back
    ensure_signing(app, settings)
    assert _encoder() is not second
    third = _encoder()
    ensure_signing(app, settings)
    assert _encoder() is third
