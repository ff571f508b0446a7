"""redis_url is checked when the settings load: one line, never the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.redis_url import check_redis_url
from config.settings import ConfigError, load_settings

SECRET = "hunter2-secret"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        f"redis://drover:{SECRET}@redis.example:6379",
        f"redis://:{SECRET}@redis/15",  # a compose service name
        f"redis://:{SECRET}@[fd00::9]:6379/0",
        f"redis://:{SECRET}@10.0.0.9/",
        f"redis://:{SECRET}%2Fx@10.0.0.9:6379/0",  # a '/' percent-encoded
        "rediss://drover:pw@redis.example:6380/0?ssl_cert_reqs=required"
        "&ssl_ca_certs=/etc/drover/redis-ca.pem",
        "rediss://drover:pw@redis.example:6380/0?ssl_certfile=/etc/drover/c.pem"
        "&ssl_keyfile=/etc/drover/c.key",
        "rediss://drover:pw@redis.example:6380/0",
    ],
)
def test_good_urls_pass(url: str) -> None:
    assert check_redis_url(url, insecure=False) == url


BAD = {
    f"redis://:{SECRET}@127.0.0.1:abc/0": "redis_url port 'abc' is not a number from 1 to 65535",
    f"redis://:{SECRET}@127.0.0.1:99999/0": "port '99999' is not a number from 1 to 65535",
    f"redis://:{SECRET}@127.0.0.1:0/0": "port '0'",
    f"redis://:{SECRET}@127.0.0.1:/0": "port ''",
    f"redis://:{SECRET}@[::1": "malformed host part",
    f"redis://:{SECRET}@[::1]:abc/0": "port 'abc'",
    f"redis://:{SECRET}@[10.0.0.9]/0": "brackets hold an IPv6 address only",
    f"redis://:{SECRET}@[fe80::1%25eth0]/0": "brackets hold an IPv6 address only",
    f"redis://:{SECRET}@/0": "has no host",
    f"redis://:{SECRET}@h;id/0": "host 'h;id' is not an IP address or host name",
    f"redis://:{SECRET}@h/abc": "database '/abc' must be a number",
    f"redis://:{SECRET}@h/0/1": "database '/0/1'",
    f"redis://:{SECRET}@h/99999999999": "database",
    f"redis://:{SECRET}@h/0?socket_timeout=abc": "query parameter 'socket_timeout' is not allowed",
    f"redis://:{SECRET}@h/0?connection_class=x": "'connection_class' is not allowed",
    f"redis://:{SECRET}@h/0?password={SECRET}": "query parameter 'password' is not allowed",
    f"redis://:{SECRET}@h/0?db=1": "'db' is not allowed",
    f"redis://:{SECRET}@h/0?": "empty query",
    f"redis://:{SECRET}@h/0?x": "malformed query",
    f"redis://:{SECRET}@h/0?ssl_cert_reqs=required": "ssl_cert_reqs needs rediss:// (TLS)",
    f"rediss://:{SECRET}@h/0?ssl_cert_reqs=bogus": "ssl_cert_reqs='bogus' must be required,",
    f"rediss://:{SECRET}@h/0?ssl_cert_reqs=CERT_REQUIRED": "write required",
    f"rediss://:{SECRET}@h/0?ssl_ca_certs=../ca.pem": "must be a plain absolute path",
    f"rediss://:{SECRET}@h/0?ssl_keyfile=/etc/../k": "must be a plain absolute path",
    f"rediss://:{SECRET}@h/0?ssl_ca_certs=/a&ssl_ca_certs=/b": "repeats a query parameter",
    f"redis://:{SECRET}/x@h/0": "percent-encode them in the password",
    f"redis://:{SECRET}?x@h/0": "percent-encode",
    f"redis://:{SECRET}#x@h/0": "percent-encode",
    f"redis://:{SECRET}@h/0#frag": "has a fragment",
    f"redis://:{SECRET} @h/0": "whitespace, control or non-ASCII",
    f"redis://:{SECRET}@h/0\n": "whitespace, control or non-ASCII",
    f"redis://:{SECRET}\u00e9@h/0": "non-ASCII",
    f"redis://:{SECRET}@h:\u0664\u0669/0": "non-ASCII",
    f"http://:{SECRET}@h/": "redis_url must start with redis://, rediss:// or sentinel://",
    f"unix://:{SECRET}@/run/redis.sock": "must start with redis://",
    f"{SECRET}@h:6379": "must start with redis://",
}


@pytest.mark.parametrize("url", BAD)
def test_bad_urls_are_one_line_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as exc:
        check_redis_url(url, insecure=False)
    message = str(exc.value)
    assert BAD[url] in message
    assert SECRET not in message
    assert "\n" not in message


UNVERIFIED = ["none", "CERT_NONE", "optional", "CERT_OPTIONAL"]


@pytest.mark.parametrize("mode", UNVERIFIED)
def test_unverified_tls_needs_insecure(mode: str) -> None:
    url = f"rediss://:{SECRET}@h/0?ssl_cert_reqs={mode}"
    with pytest.raises(ValueError) as exc:
        check_redis_url(url, insecure=False)
    message = str(exc.value)
    assert f"ssl_cert_reqs={mode} does not verify the Redis server's certificate" in message
    assert "[security] insecure = true" in message and SECRET not in message


@pytest.mark.parametrize("mode", ["none", "optional"])
def test_insecure_allows_unverified_tls(mode: str) -> None:
    url = f"rediss://:{SECRET}@h/0?ssl_cert_reqs={mode}"
    assert check_redis_url(url, insecure=True) == url


@pytest.mark.parametrize("mode", ["CERT_NONE", "CERT_OPTIONAL"])
def test_insecure_still_wants_the_word_redis_py_reads(mode: str) -> None:
    with pytest.raises(ValueError, match="redis-py reads only words"):
        check_redis_url(f"rediss://h/0?ssl_cert_reqs={mode}", insecure=True)


# ---- through load_settings: from the file and from the environment --------------------------

HOST = """
[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"
"""


def write(tmp_path: Path, url: str, *, insecure: bool = False) -> Path:
    path = tmp_path / "drover.toml"
    security = "\n[security]\ninsecure = true\n" if insecure else ""
    path.write_text(f"redis_url = {url!r}\n{HOST}{security}")
    return path


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"redis://:{SECRET}@10.0.0.9:abc/0", "port 'abc'"),
        (f"redis://:{SECRET}@10.0.0.9:99999/0", "port '99999'"),
        (f"redis://:{SECRET}@[::1", "malformed host part"),
        (f"redis://:{SECRET}@10.0.0.9/0?socket_timeout=abc", "'socket_timeout' is not allowed"),
        (f"rediss://:{SECRET}@10.0.0.9/0?ssl_cert_reqs=bogus", "'bogus' must be required"),
        (f"rediss://:{SECRET}@10.0.0.9/0?ssl_cert_reqs=none", "does not verify"),
    ],
)
def test_load_settings_refuses_in_one_line_naming_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    path = write(tmp_path, url)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    said = str(exc.value)
    assert said.startswith(f"config {path}: redis_url ") and message in said
    assert SECRET not in said and "\n" not in said

    monkeypatch.setenv("DROVER_REDIS_URL", url)
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, "redis://127.0.0.1:6379/0"))
    said = str(exc.value)
    assert said.startswith("$DROVER_REDIS_URL: redis_url ") and message in said
    assert SECRET not in said and "\n" not in said


def test_insecure_in_the_file_allows_unverified_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    url = f"rediss://:{SECRET}@10.0.0.9/0?ssl_cert_reqs=none"
    assert load_settings(write(tmp_path, url, insecure=True)).redis_url == url
