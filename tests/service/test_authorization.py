"""Who may do what: the matrix of every client x key x operation, over real HTTP.

Allowed: the operation runs (whatever it then answers). Not allowed: 403 ``forbidden``,
with one ``service_auth`` audit entry naming the client and no other entry: no key was
touched. No or a wrong token: 401 ``unauthenticated``, audited the same way, on every
endpoint but the public ones. A client learns nothing about keys outside its list: a
name it could not have used is 403 whether or not such a key exists."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
from tests.bitcoin.test_signer import Spend, build_psbt
from tests.service.conftest import CLIENTS, KEYS, Running

from anyhsm.errors import Forbidden, HsmError, KeyNotFound, Unauthenticated
from anyhsm.service.routes import ENDPOINTS
from anyhsm.service.settings import ClientSpec, Op

DIGEST = hashlib.sha256(b"matrix").digest()


def audit_lines(r: Running) -> list[dict[str, object]]:
    return [json.loads(line) for line in r.hsm.audit_path.read_text().splitlines()]


def attempt(r: Running, client: str, key: str, op: Op) -> None:
    """One request of ``op`` on ``key`` as ``client``; raises what the service answers."""
    c = r.client(client)
    assert r.wallet is not None
    if op is Op.READ:
        c.get_key(key)
    elif op is Op.SIGN_DIGEST:
        c.sign(key, DIGEST)
    elif op is Op.SIGN_MESSAGE:
        c.sign_message(key, "matrix")
    elif op is Op.SIGN_PSBT:
        psbt = build_psbt([Spend("p2wpkh", [r.wallet.key("m/84h/1h/0h/0/0")])])
        c.sign_psbt(key, psbt)
    elif op is Op.APPROVE:  # no spending policy is set: refused by the operation, audited
        body = {"txid": "00" * 32, "pubkey": "02" + "00" * 32, "signature": "", "expires": 1}
        c.request("POST", "/v1/policy/approvals", body)
    else:
        c.verify_audit()


def allowed(client: str, key: str, op: Op) -> bool:
    patterns, ops = CLIENTS[client]
    spec = ClientSpec(client, "sha256:" + "0" * 64 + ":" + "0" * 64, patterns, ops)
    return op in ops and (op in (Op.ADMIN, Op.APPROVE) or spec.may_use("-", key))


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_matrix(service: Running, client: str) -> None:
    for key in (*KEYS, "w"):
        for op in Op:
            before = len(audit_lines(service))
            try:
                attempt(service, client, key, op)
                refused = False
            except Forbidden:
                refused = True
            except HsmError:  # allowed, and the operation itself answered (NothingSigned...)
                refused = False
            assert refused == (not allowed(client, key, op)), (client, key, op)
            new = audit_lines(service)[before:]
            if refused:
                assert [e["op"] for e in new] == ["service_auth"], (client, key, op, new)
                assert new[0]["principal"] == client and new[0]["error"] == "forbidden"
                assert new[0]["outcome"] == "refused"
            else:
                assert all(e.get("principal") == client for e in new), new
                assert new or op in (Op.READ, Op.ADMIN)  # reads are not audited; the rest is
                assert all(e["op"] != "service_auth" for e in new)


def test_unknown_names_say_nothing_outside_the_clients_keys(service: Running) -> None:
    c = service.client("signer")  # hot-* and w
    with pytest.raises(KeyNotFound):
        c.sign("hot-9", DIGEST)  # could be one of its keys: not found
    with pytest.raises(Forbidden):
        c.sign("cold-9", DIGEST)  # could never be: forbidden, as for cold-1 that exists
    with pytest.raises(Forbidden):
        c.sign("cold-1", DIGEST)
    cold = service.hsm.get_key("cold-1")
    with pytest.raises(Forbidden):
        c.sign(cold.id, DIGEST)  # by id: the key's label decides
    hot = service.hsm.get_key("hot-1")
    assert c.sign(hot.id, DIGEST)


def _call(r: Running, token: str | None) -> Callable[[str, str], None]:
    c = r.client(None, token)

    def call(method: str, path: str) -> None:
        body = {"digest": DIGEST.hex(), "digests": [DIGEST.hex()], "psbt": "", "key": "hot-1"}
        c.request(method, path.replace("{key}", "hot-1"), body if method == "POST" else None)

    return call


@pytest.mark.parametrize("token", [None, "", "ahs_not-a-token", "Bearer", "x" * 300])
def test_every_endpoint_but_the_public_needs_a_token(service: Running, token: str | None) -> None:
    call = _call(service, token)
    for e in ENDPOINTS:
        if e.op is None:
            call(e.method, e.path)
            continue
        before = len(audit_lines(service))
        with pytest.raises(Unauthenticated):
            call(e.method, e.path)
        new = audit_lines(service)[before:]
        assert [x["op"] for x in new] == ["service_auth"], e.path
        assert new[0]["error"] == "unauthenticated"
        assert new[0]["principal"] == "(unauthenticated)"


def test_wrong_scheme_and_the_www_authenticate_header(service: Running) -> None:
    c = service.client(None)
    status, body, headers = c.request(
        "GET",
        "/v1/keys",
        headers={"Authorization": "Basic " + service.tokens["admin"]},
        accept=(401,),
    )
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["code"] == "unauthenticated"


def test_a_flood_of_bad_tokens_is_audited_only_up_to_a_bound(start: Callable[..., Running]) -> None:
    r = start(unauthenticated_per_s=5.0)
    c = r.client(None, "ahs_wrong")
    before = len(audit_lines(r))
    for _ in range(60):
        with pytest.raises(Unauthenticated):
            c.list_keys()
    audited = [e for e in audit_lines(r)[before:] if e["op"] == "service_auth"]
    assert 5 <= len(audited) < 60
    assert (
        'anyhsm_auth_failures_total{reason="unauthenticated"} 60.0' in r.client("reader").metrics()
    )
