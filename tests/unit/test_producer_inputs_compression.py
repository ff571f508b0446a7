"""Compression options are taken only as their own types, as the request around them: a level
given as True or as '3' is refused naming the option the user typed, not read as 1 or 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import load_settings
from jobs.errors import SubmitError
from producer.api import Drover
from tests.conftest import RedisServer

MIGRATION: dict[str, Any] = {"domain": "idle-1", "src": "kvm1", "dst": "kvm2", "live": True}


@pytest.mark.parametrize(
    ("compression", "said"),
    [
        ({"methods": ["mt"], "mt_level": True}, "--comp-mt-level True: Input should be a valid"),
        ({"methods": ["mt"], "mt_level": "3"}, "--comp-mt-level '3': Input should be a valid"),
        ({"methods": ["mt"], "mt_level": 3.0}, "--comp-mt-level 3.0: Input should be a valid"),
        ({"methods": ["mt"], "mt_threads": "4"}, "--comp-mt-threads '4': "),
        ({"methods": ["mt"], "mt_dthreads": False}, "--comp-mt-dthreads False: "),
        ({"methods": ["xbzrle"], "xbzrle_cache_mib": "64"}, "--comp-xbzrle-cache '64': "),
        ({"methods": ["zstd"], "zstd_level": True}, "--comp-zstd-level True: "),
        ({"methods": ["zlib"], "zlib_level": "1"}, "--comp-zlib-level '1': "),
        ({"methods": [1]}, "--comp-methods 1: Input should be 'none', 'xbzrle', 'mt'"),
    ],
)
def test_a_compression_value_of_the_wrong_type_is_refused_naming_its_option(
    config: Path, redis_srv: RedisServer, compression: dict[str, Any], said: str
) -> None:
    d = Drover(load_settings(config))
    with pytest.raises(SubmitError) as caught:
        d.spec(**MIGRATION, parallel=2, compression=compression)
    message = str(caught.value)
    assert message.startswith(said), message
    assert "\n" not in message
    with pytest.raises(SubmitError):  # nothing queued either
        d.submit(**MIGRATION, parallel=2, compression=compression)
    assert redis.Redis.from_url(redis_srv.url).keys("drover:job:*") == []


def test_the_words_of_the_cli_and_a_records_json_still_read(config: Path) -> None:
    d = Drover(load_settings(config))
    spec = d.spec(**MIGRATION, compression={"methods": ["mt", "xbzrle"], "mt_level": 3})
    assert spec.compression is not None
    assert [m.value for m in spec.compression.methods] == ["mt", "xbzrle"]
    assert spec.compression.mt_level == 3
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec
    assert type(spec).model_validate(spec.model_dump(mode="json")) == spec
