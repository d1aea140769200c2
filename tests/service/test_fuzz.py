"""Malformed, oversized, truncated and fuzzed requests get a 4xx in the API's error shape,
never a 500 (and never a traceback): hypothesis builds JSON bodies of every shape for
every endpoint, and raw bytes that are not JSON; a raw socket sends bodies cut short."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.service.conftest import Running

from anyhsm.client import Client
from anyhsm.errors import HsmError
from anyhsm.service.routes import ENDPOINTS

POSTS = [e.path for e in ENDPOINTS if e.method == "POST"]
GETS = [e.path for e in ENDPOINTS if e.method == "GET"]
KEY_NAMES = st.sampled_from(["hot-1", "w", "cold-1", "nope", "%2F..%2F", "a" * 129, "%00", "é"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
MEMBERS = [
    "digest",
    "digests",
    "scheme",
    "signature",
    "psbt",
    "key",
    "message",
    "address",
    "path",
    "type",
    "bip322",
]
bodies = st.dictionaries(st.sampled_from(MEMBERS), json_values, max_size=6) | json_values


_CLIENTS: dict[int, Client] = {}


def admin(service: Running) -> Client:
    if id(service) not in _CLIENTS:
        _CLIENTS.clear()
        _CLIENTS[id(service)] = service.client("admin")
    return _CLIENTS[id(service)]


def _check(status: int, body: bytes) -> None:
    assert 200 <= status < 500, (status, body[:300])
    if status >= 400:
        err = json.loads(body)["error"]
        assert {"code", "error", "message"} <= set(err)
        assert "Traceback" not in body.decode()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(POSTS), key=KEY_NAMES, body=bodies)
def test_fuzzed_json_bodies_are_never_500(
    service: Running, path: str, key: str, body: object
) -> None:
    try:
        status, raw, _ = admin(service).request("POST", path.replace("{key}", key), body)  # type: ignore[arg-type]
    except HsmError as e:
        assert e.code != "internal_error", e
        return
    _check(status, raw)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(GETS),
    key=KEY_NAMES,
    query=st.dictionaries(
        st.sampled_from(["path", "type", "account", "limit", "slip132", "since", "op"]),
        st.text(max_size=30),
        max_size=3,
    ),
)
def test_fuzzed_queries_are_never_500(
    service: Running, path: str, key: str, query: dict[str, str]
) -> None:
    try:
        admin(service).request("GET", path.replace("{key}", key), query=query)  # type: ignore[arg-type]
    except HsmError as e:
        assert e.code != "internal_error", e


def raw_exchange(url: str, data: bytes, *, shut: bool = True) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=300))
def test_raw_bytes_bodies_are_4xx(service: Running, payload: bytes) -> None:
    token = service.tokens["admin"]
    head = (
        "POST /v1/keys/hot-1/sign HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = raw_exchange(service.url, head + payload, shut=False)
    status = int(answer.split(b" ", 2)[1])
    body = answer.split(b"\r\n\r\n", 1)[1]
    if status != 200:
        _check(status, body)


POST = b"POST /v1/keys/hot-1/sign HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        POST + b"Authorization: Bearer TOKEN\r\nContent-Length: 100\r\n\r\n" + b'{"digest":',
        POST + b'Authorization: Bearer TOKEN\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"dig\r\n',
        b"POST /v1/keys/hot-1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x00\x01\xff\r\n\r\n",
    ],
)
def test_truncated_and_malformed_http_is_never_500(service: Running, request_bytes: bytes) -> None:
    data = request_bytes.replace(b"TOKEN", service.tokens["admin"].encode())
    answer = raw_exchange(service.url, data)
    if answer:  # aiohttp may just close a connection whose request never ended
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
    assert service.client("admin").list_keys()  # the service is still fine
