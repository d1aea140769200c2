"""The endpoints: each parses its request, checks who may call it, calls one operation of
:mod:`anyhsm.ops` in a worker thread and sends what that returns (its ``to_dict``, the
object the CLI prints under ``--json``).

:data:`ENDPOINTS` is the one list of them: the application's routes are made from it, and
tests/service/test_openapi.py keeps it equal to the committed OpenAPI document.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from anyhsm.errors import (
    HsmError,
    InvalidDigest,
    InvalidRequest,
    NothingSigned,
    PolicyViolation,
    RequestTooLarge,
    UnsupportedOperation,
)
from anyhsm.ops.data import hex_bytes
from anyhsm.service.app import (
    CLIENT_KEY,
    Caller,
    Service,
    json_response,
    service_of,
)
from anyhsm.service.metrics import CONTENT_TYPE
from anyhsm.service.settings import Op
from anyhsm.types import KeyInfo, SigScheme

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    op: Op | None  # None: public (no token)
    handler: Handler
    idempotent: bool = False  # honours Idempotency-Key


# --- request parsing ------------------------------------------------------------------------


async def _body(request: web.Request) -> tuple[bytes, dict[str, object]]:
    """The raw body and its JSON object; InvalidRequest for anything else."""
    try:
        raw = await request.read()
    except (ConnectionError, ClientPayloadError, HttpProcessingError):
        raise InvalidRequest("the request body was cut short or is not valid HTTP") from None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not JSON", hint="send a JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return raw, obj


def _str(body: dict[str, object], name: str, *, max_len: int = 1 << 24) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"member {name!r} is required and must be a string")
    if len(value) > max_len:
        raise RequestTooLarge(f"member {name!r} is longer than {max_len} characters")
    return value


def _opt_str(body: dict[str, object], name: str, *, max_len: int = 4096) -> str | None:
    if body.get(name) is None:
        return None
    return _str(body, name, max_len=max_len)


def _opt_bool(body: dict[str, object], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"member {name!r} must be true or false")
    return value


def _scheme(body: dict[str, object]) -> SigScheme:
    text = body.get("scheme", "ecdsa")
    try:
        return SigScheme(text)
    except ValueError:
        raise InvalidRequest('member \'scheme\' must be "ecdsa" or "schnorr"') from None


def _digest(text: object, what: str = "digest") -> bytes:
    if not isinstance(text, str) or len(text) != 64:
        raise InvalidDigest(f"{what} must be 64 hexadecimal digits (32 bytes)")
    return hex_bytes(text, what)


def _path(body: dict[str, object]) -> str | None:
    """The optional ``path`` member: a BIP32 path as text (``m/84'/1'/0'/0/5``; ``'``,
    ``h`` or ``H`` for hardened), the form of every other endpoint and of the CLI's
    ``--path``; parsed by :func:`_steps` once the key is known."""
    return _opt_str(body, "path", max_len=4096)


def _tweak(body: dict[str, object]) -> bytes | None:
    """The optional ``tweak`` member: a BIP341 tweak, 64 hex digits (32 bytes), a scalar
    below the curve order."""
    from anyhsm.crypto.secp256k1 import CURVE_ORDER

    text = body.get("tweak")
    if text is None:
        return None
    if not isinstance(text, str) or len(text) != 64:
        raise InvalidRequest("member 'tweak' must be 64 hexadecimal digits (32 bytes)")
    tweak = hex_bytes(text, "tweak")
    if int.from_bytes(tweak, "big") >= CURVE_ORDER:
        raise InvalidRequest("member 'tweak' is not below the secp256k1 group order")
    return tweak


def _steps(svc: Service, info: KeyInfo, path: str | None) -> tuple[int, ...]:
    """The child indexes of ``path`` for the key: a key whose provider cannot derive
    refuses any path before it is parsed (unsupported_operation), as the CLI's local
    path answers (cli/backend.LocalBackend), else bip32_error for a malformed path."""
    from anyhsm.bitcoin.bip32 import parse_path

    if not path:
        return ()
    if not svc.hsm.capabilities(info.id).can_derive:
        raise UnsupportedOperation(info.provider, "BIP32 derivation")
    return parse_path(path)


def _query(request: web.Request, name: str, *, max_len: int = 256) -> str | None:
    value = request.query.get(name)
    if value is not None and len(value) > max_len:
        raise InvalidRequest(f"query parameter {name!r} is too long")
    return value


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = _query(request, name, max_len=12)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"query parameter {name!r} must be {lo} to {hi}")
    return value


def _psbt_text(svc: Service, body: dict[str, object]) -> str:
    """The ``psbt`` member (base64, or hex): parsed by the operation under
    policy.max_psbt_bytes (PsbtLimitExceeded, 413, past it)."""
    limit = svc.hsm.config.policy.max_psbt_bytes
    return _str(body, "psbt", max_len=2 * limit + 4)


def _key_name(request: web.Request) -> str:
    name = request.match_info["key"]
    if not name or len(name) > 128:
        raise InvalidRequest("a key is named by a label or id of 1 to 128 characters")
    return name


async def _caller(request: web.Request, op: Op | None) -> tuple[Service, Caller]:
    svc = service_of(request)
    caller = await svc.authenticate(request, op)
    if caller.client is not None:
        request[CLIENT_KEY] = caller.client.name
    return svc, caller


# --- public -------------------------------------------------------------------------------


async def ready(request: web.Request) -> web.StreamResponse:
    svc, _ = await _caller(request, None)
    ok, reasons = await svc.readiness()
    hsm = svc.hsm
    body = {
        "ready": ok,
        "reasons": reasons,
        "active_provider": hsm.active_provider,
        "security_level": hsm.security_level.label,
    }
    resp = json_response(body, 200 if ok else 503)
    if not ok:
        resp.headers["Retry-After"] = "1"
    return resp


async def openapi(request: web.Request) -> web.StreamResponse:
    from anyhsm.service.openapi import document_bytes

    return web.Response(body=document_bytes(), content_type="application/json")


async def metrics(request: web.Request) -> web.StreamResponse:
    svc = service_of(request)
    await _caller(request, None if svc.settings.public_metrics else Op.READ)
    resp = web.Response(body=svc.metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


# --- read ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.admin import health as health_of

    svc, caller = await _caller(request, Op.READ)
    hsm = svc.hsm
    outcome = await svc.run(caller, lambda: health_of(lambda: hsm, hsm.config))
    data = outcome.to_dict()
    svc.observe_health(data)
    return json_response(data)


# the modules the endpoints import when first called: imported at startup instead, so that
# no request blocks the loop for an import (a PSBT's first request took about 0.1 s)
_OPERATION_MODULES = (
    "anyhsm.audit_query",
    "anyhsm.ops.admin",
    "anyhsm.ops.bitcoin",
    "anyhsm.ops.keys",
    "anyhsm.ops.policy",
    "anyhsm.ops.psbt",
    "anyhsm.ops.signing",
    "anyhsm.service.openapi",
    "anyhsm.signer._ops",
)


def import_operations() -> None:
    for name in _OPERATION_MODULES:
        importlib.import_module(name)


async def count_keys(svc: Service) -> int:
    """How many keys the deployment has: per-key metric series only below the bound."""
    from anyhsm.ops.keys import list_keys

    n = len((await svc.run(None, lambda: list_keys(svc.hsm), timeout=None)).keys)
    svc.metrics.key_series = n < svc.metrics.max_keys
    return n


async def keys(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.keys import list_keys

    svc, caller = await _caller(request, Op.READ)
    found = await svc.run(caller, lambda: list_keys(svc.hsm))
    client = caller.client
    assert client is not None
    svc.metrics.key_series = len(found.keys) < svc.metrics.max_keys
    mine = [key_json(k) for k in found.keys if client.may_use(k.id, k.label)]
    return json_response({"keys": mine})


async def key_show(request: web.Request) -> web.StreamResponse:
    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    info = await svc.run(caller, lambda: svc.authorized_key(caller, name, fresh=True))
    return json_response(key_json(info))


def key_json(info: KeyInfo) -> dict[str, object]:
    """``key show --json``'s object, and the chain code of an HD key (public: what makes
    the master public key an xpub), so that a client rebuilds the same KeyInfo."""
    chain = info.chain_code
    return {**info.to_dict(), "chain_code": None if chain is None else chain.hex()}


async def xpub(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops import bitcoin

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    path = _query(request, "path", max_len=4096)
    slip132 = _query(request, "slip132", max_len=16)

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        return bitcoin.xpub(svc.hsm, info.id, path, slip132=slip132).to_dict()

    return json_response(await svc.run(caller, work))


async def address(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops import bitcoin

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    path = _query(request, "path", max_len=4096)
    kind = _query(request, "type", max_len=16) or "p2wpkh"

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        return bitcoin.address(svc.hsm, info.id, path, kind=kind).to_dict()

    return json_response(await svc.run(caller, work))


async def descriptor(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops import bitcoin

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    dtype = _query(request, "type", max_len=16) or "wpkh"
    account = _query_int(request, "account", 0, 0, 2**31 - 1)

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        return bitcoin.descriptor(svc.hsm, info.id, dtype, account=account).to_dict()

    return json_response(await svc.run(caller, work))


async def descriptors(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops import bitcoin

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    account = _query_int(request, "account", 0, 0, 2**31 - 1)

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        return bitcoin.wallet_descriptors(svc.hsm, info.id, account=account).to_dict()

    return json_response(await svc.run(caller, work))


async def descriptor_address(request: web.Request) -> web.StreamResponse:
    """Core's ``displayaddress``: the address of a one-address descriptor of this key,
    refused unless its fingerprint and key are this key's at a path the signing policy
    signs (:func:`anyhsm.signer._ops.descriptor_address`, what ``anyhsm-signer`` checks
    locally)."""
    from anyhsm.signer._ops import descriptor_address as address_of

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    _, body = await _body(request)
    text = _str(body, "descriptor", max_len=4096)

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name, fresh=True)
        return {"address": address_of(svc.hsm, info, text)}

    return json_response(await svc.run(caller, work))


async def verify(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.signing import verify_digest

    svc, caller = await _caller(request, Op.READ)
    name = _key_name(request)
    _, body = await _body(request)
    digest = _digest(body.get("digest"))
    signature = hex_bytes(_str(body, "signature", max_len=256), "signature")
    scheme = _scheme(body)
    path, tweak = _path(body), _tweak(body)

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        steps = _steps(svc, info, path)
        res = verify_digest(svc.hsm, info.id, digest, signature, scheme, path=steps, tweak=tweak)
        return res.to_dict()

    return json_response(await svc.run(caller, work, inline=svc.in_process((name,))))


async def psbt_finalize(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.psbt import finalize_psbt, parse_psbt

    svc, caller = await _caller(request, Op.READ)
    _, body = await _body(request)
    data = _psbt_text(svc, body)
    limit = svc.hsm.config.policy.max_psbt_bytes

    def work() -> dict[str, object]:
        return finalize_psbt(parse_psbt(data, max_bytes=limit)).to_dict()

    return json_response(await svc.run(caller, work))


async def psbt_inspect(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.psbt import inspect_psbt, parse_psbt

    svc, caller = await _caller(request, Op.READ)
    _, body = await _body(request)
    data = _psbt_text(svc, body)
    limit = svc.hsm.config.policy.max_psbt_bytes

    def work() -> dict[str, object]:
        return inspect_psbt(parse_psbt(data, max_bytes=limit), svc.hsm.network).to_dict()

    return json_response(await svc.run(caller, work))


async def policy_check(request: web.Request) -> web.StreamResponse:
    """``anyhsm policy check``: the spending policy's decision on a PSBT, nothing signed."""
    from anyhsm.ops.policy import check_psbt
    from anyhsm.ops.psbt import parse_psbt

    svc, caller = await _caller(request, Op.SIGN_PSBT)
    _, body = await _body(request)
    name = _str(body, "key", max_len=128)
    data = _psbt_text(svc, body)
    limit = svc.hsm.config.policy.max_psbt_bytes

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        return check_psbt(svc.hsm, parse_psbt(data, max_bytes=limit), info.id).to_dict()

    return json_response(await svc.run(caller, work))


MAX_APPROVAL_SECONDS = 31 * 86400
"""The longest validity ``POST /v1/policy/requests`` gives an approval request."""


async def policy_request(request: web.Request) -> web.StreamResponse:
    """``anyhsm policy request``: the exact message approvers sign for a PSBT under the
    active policy, and the rules that want approvals; nothing signed, debited or kept.
    Right ``sign-psbt`` on the key, as ``/v1/policy/check``: asking is the first step of a
    spend by that key, and the answer shows the policy's verdicts and approvers."""
    from anyhsm.ops.policy import approval_request
    from anyhsm.ops.psbt import parse_psbt

    svc, caller = await _caller(request, Op.SIGN_PSBT)
    _, body = await _body(request)
    name = _str(body, "key", max_len=128)
    data = _psbt_text(svc, body)
    expires_in = body.get("expires_in", 3600)
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int)
        or not 1 <= expires_in <= MAX_APPROVAL_SECONDS
    ):
        raise InvalidRequest(
            f"member 'expires_in' must be an integer of seconds, 1 to {MAX_APPROVAL_SECONDS}"
        )
    limit = svc.hsm.config.policy.max_psbt_bytes

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        psbt = parse_psbt(data, max_bytes=limit)
        return approval_request(svc.hsm, psbt, info.id, expires_in=expires_in).to_dict()

    return json_response(await svc.run(caller, work))


async def policy_approve(request: web.Request) -> web.StreamResponse:
    """``anyhsm policy approve``: one approver's signature, kept until used or expired."""
    from anyhsm.ops.policy import submit_approval

    svc, caller = await _caller(request, Op.APPROVE)
    _, body = await _body(request)
    txid = _str(body, "txid", max_len=64)
    pubkey = _str(body, "pubkey", max_len=66)
    signature = _str(body, "signature", max_len=4096)
    policy = _opt_str(body, "policy", max_len=64)
    expires = body.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, int):
        raise InvalidRequest("member 'expires' is required and must be an integer (Unix time)")

    def work() -> dict[str, object]:
        res = submit_approval(svc.hsm, txid, pubkey, signature, expires, policy=policy)
        return res.to_dict()

    return json_response(await svc.run(caller, work))


async def message_verify(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.bitcoin import verify_message

    svc, caller = await _caller(request, Op.READ)
    _, body = await _body(request)
    addr = _str(body, "address", max_len=128)
    message = _str(body, "message", max_len=1 << 20)
    signature = _str(body, "signature", max_len=1 << 16)
    network = svc.hsm.network
    return json_response(
        await svc.run(caller, lambda: verify_message(addr, message, signature, network).to_dict())
    )


# --- signing ---------------------------------------------------------------------------------


async def sign(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.signing import sign_digest

    svc, caller = await _caller(request, Op.SIGN_DIGEST)
    name = _key_name(request)
    _, body = await _body(request)
    digest = _digest(body.get("digest"))
    scheme = _scheme(body)
    path, tweak = _path(body), _tweak(body)
    m = svc.metrics

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        steps = _steps(svc, info, path)
        t0 = time.perf_counter()
        try:
            res = sign_digest(svc.hsm, info.id, digest, scheme, path=steps, tweak=tweak)
        except HsmError:
            m.signed(info.id, info.provider, scheme.value, "error")
            raise
        m.signing_seconds.labels("sign").observe(time.perf_counter() - t0)
        m.signed(info.id, info.provider, scheme.value, "ok")
        return {**res.to_dict(), "key": name, "key_id": info.id}

    # A software signature takes tens of microseconds: on the loop, not via a worker
    # (Service.run); a key not yet routed, or on a device, goes to a worker.
    return json_response(await svc.run(caller, work, inline=svc.may_run_inline((name,))))


async def sign_batch(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.signing import sign_digests

    svc, caller = await _caller(request, Op.SIGN_DIGEST)
    name = _key_name(request)
    raw, body = await _body(request)
    items = body.get("digests")
    if not isinstance(items, list) or not items:
        raise InvalidRequest("member 'digests' is required: a non-empty list of 64-hex strings")
    if len(items) > svc.settings.max_batch:
        raise RequestTooLarge(
            f"a batch holds at most {svc.settings.max_batch} digests, not {len(items)}",
            hint="split it, or raise service.max_batch",
        )
    scheme = _scheme(body)
    # an item that is not 64 hex digits is passed as no digest: the operation reports
    # it as that item's error, as it does a digest of the wrong length
    digests = [_hex32_or_empty(item) for item in items]
    path, tweak = _path(body), _tweak(body)
    m = svc.metrics

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        steps = _steps(svc, info, path)
        n = sum(1 for d in digests if len(d) == 32)
        t0 = time.perf_counter()
        try:
            res = sign_digests(svc.hsm, info.id, digests, scheme, path=steps, tweak=tweak)
        except HsmError:
            m.signed(info.id, info.provider, scheme.value, "error", n)
            raise
        m.signing_seconds.labels("sign-batch").observe(time.perf_counter() - t0)
        m.signed(info.id, info.provider, scheme.value, "ok", n)
        results: list[dict[str, object]] = [
            {"index": r.index, "signature": r.signature.hex()}
            if r.signature is not None
            else {"index": r.index, "error": r.error.to_dict() if r.error else None}
            for r in res.results
        ]
        return {"results": results, "scheme": scheme.value, "key": name, "key_id": info.id}

    local = svc.in_process((name,))

    async def compute() -> web.Response:
        return json_response(await svc.run(caller, work, timeout=None, local=local))

    return await svc.idempotent(request, caller, raw, compute)


def _hex32_or_empty(item: object) -> bytes:
    if isinstance(item, str) and len(item) == 64:
        try:
            return bytes.fromhex(item)
        except ValueError:
            pass
    return b""


async def psbt_sign(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.psbt import parse_psbt, sign_psbt

    svc, caller = await _caller(request, Op.SIGN_PSBT)
    raw, body = await _body(request)
    names = _signing_key_names(body)
    data = _psbt_text(svc, body)
    limit = svc.hsm.config.policy.max_psbt_bytes
    m = svc.metrics

    def work() -> dict[str, object]:
        infos = _signing_keys(svc, caller, names)
        psbt = parse_psbt(data, max_bytes=limit)
        # metrics name one key (the first): per-key series stay one per request
        first = infos[0] if infos else None
        key_id, provider = (first.id, first.provider) if first else ("", svc.hsm.active_provider)
        t0 = time.perf_counter()
        try:
            if not infos:
                raise NothingSigned(
                    f"client {caller.name!r} may use no key that signs Bitcoin transactions",
                    hint="name the keys (key, keys), or widen the client's keys",
                )
            res = sign_psbt(svc.hsm, psbt, [i.id for i in infos])
        except PolicyViolation as e:
            rules = sorted({str(d["rule"]) for d in e.details if "rule" in d}) or [e.code]
            for rule in rules:
                m.policy.labels(rule, "refuse").inc()
            m.signed(key_id, provider, "psbt", "refused")
            raise
        except HsmError:
            m.signed(key_id, provider, "psbt", "error")
            raise
        m.signing_seconds.labels("psbt-sign").observe(time.perf_counter() - t0)
        m.policy.labels("all", "allow").inc()
        m.signed(key_id, provider, "psbt", "ok", max(res.signatures, 1))
        return res.to_dict()

    local = names is not None and svc.in_process(names)
    inline = local and len(data) <= INLINE_PSBT_CHARS and svc.may_run_inline(names or ())

    async def compute() -> web.Response:
        return json_response(await svc.run(caller, work, timeout=None, local=local, inline=inline))

    return await svc.idempotent(request, caller, raw, compute)


INLINE_PSBT_CHARS = 16384
"""A PSBT of in-process keys up to this size (base64 or hex text; some 50 P2WPKH inputs
with their previous outputs, a few milliseconds of signing) is signed on the event loop:
the loop would wait for the GIL that long anyway while a worker signed it, and the
hand-offs of the GIL between the two cost a third of the CPU of a 10-input PSBT. Larger
ones go to the local worker, so the loop still answers between its turns."""

MAX_PSBT_KEYS = 64
"""Keys one ``POST /v1/psbt/sign`` may name (``keys``)."""


def _signing_key_names(body: dict[str, object]) -> tuple[str, ...] | None:
    """Which keys sign a PSBT: exactly one of ``key`` (a label or id), ``keys`` (1 to
    :data:`MAX_PSBT_KEYS` of them: ``psbt sign --key A --key B``) and ``all_keys: true``
    (None: every key the client may use, ``psbt sign --all-keys``)."""
    given = [n for n in ("key", "keys", "all_keys") if body.get(n) is not None]
    if len(given) != 1:
        raise InvalidRequest(
            "name the signing keys with exactly one of 'key', 'keys' and 'all_keys'",
            hint='{"key": "wallet"}, {"keys": ["a", "b"]} or {"all_keys": true}',
        )
    if given[0] == "key":
        return (_str(body, "key", max_len=128),)
    if given[0] == "all_keys":
        if body["all_keys"] is not True:
            raise InvalidRequest("member 'all_keys' must be true when given")
        return None
    items = body["keys"]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("member 'keys' must be a non-empty list of key labels or ids")
    if len(items) > MAX_PSBT_KEYS:
        raise RequestTooLarge(f"a PSBT is signed by at most {MAX_PSBT_KEYS} named keys")
    if not all(isinstance(k, str) and 0 < len(k) <= 128 for k in items):
        raise InvalidRequest("each of 'keys' must be a label or id of 1 to 128 characters")
    return tuple(str(k) for k in items)


def _signing_keys(svc: Service, caller: Caller, names: tuple[str, ...] | None) -> list[KeyInfo]:
    """The keys named (each checked against the client's list, as every key-naming
    endpoint does), or with None every key of the client's list that signs Bitcoin
    transactions here: what ``psbt sign --all-keys`` (any key of the handle) takes
    locally, limited to the client's keys. In a worker thread."""
    if names is not None:
        return [svc.authorized_key(caller, n) for n in names]
    from anyhsm.bitcoin.signer import SIGNING_KEY_TYPES
    from anyhsm.ops.keys import list_keys

    client = caller.client
    assert client is not None
    return [
        k
        for k in list_keys(svc.hsm).keys
        if client.may_use(k.id, k.label) and k.available and k.key_type in SIGNING_KEY_TYPES
    ]


async def message_sign(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.bitcoin import sign_message

    svc, caller = await _caller(request, Op.SIGN_MESSAGE)
    _, body = await _body(request)
    name = _str(body, "key", max_len=128)
    message = _str(body, "message", max_len=1 << 20)
    path = _opt_str(body, "path", max_len=256)
    kind = _opt_str(body, "type", max_len=16)
    bip322 = _opt_bool(body, "bip322")
    fmt = _opt_str(body, "bip322_format", max_len=16)
    prefix = body.get("prefix", True)
    if not isinstance(prefix, bool):
        raise InvalidRequest("member 'prefix' must be true or false")
    nonce = _opt_str(body, "nonce", max_len=16) or "low-r"
    m = svc.metrics

    def work() -> dict[str, object]:
        info = svc.authorized_key(caller, name)
        t0 = time.perf_counter()
        res = sign_message(
            svc.hsm,
            info.id,
            message,
            path,
            kind=kind,
            bip322=bip322,
            bip322_format=fmt,
            prefix=prefix,
            nonce=nonce,
        )
        m.signing_seconds.labels("message-sign").observe(time.perf_counter() - t0)
        m.signed(info.id, info.provider, "message", "ok")
        return res.to_dict()

    return json_response(await svc.run(caller, work))


# --- admin -----------------------------------------------------------------------------------


async def audit_tail(request: web.Request) -> web.StreamResponse:
    from anyhsm.audit_query import AuditQuery, parse_time
    from anyhsm.ops.admin import audit_show

    svc, caller = await _caller(request, Op.ADMIN)
    since, until = _query(request, "since", max_len=40), _query(request, "until", max_len=40)
    query = AuditQuery(
        op=_query(request, "op", max_len=64),
        key=_query(request, "key", max_len=128),
        outcome=_query(request, "outcome", max_len=32),
        since=parse_time(since, "since") if since else None,
        until=parse_time(until, "until") if until else None,
        limit=_query_int(request, "limit", 100, 1, 10_000),
    )

    return json_response(await svc.run(caller, lambda: audit_show(svc.hsm, query).to_dict()))


async def policy_show(request: web.Request) -> web.StreamResponse:
    """``anyhsm policy show``: the active spending policy, its budgets as of now, frozen
    keys and approvals waiting. Right ``admin``: it is the operator's view (who holds
    which approver key, why a key was frozen); a client sees its own budget left in
    ``/v1/policy/check`` and everyone's in ``/metrics``."""
    from anyhsm.ops.policy import show_policy

    svc, caller = await _caller(request, Op.ADMIN)
    return json_response(await svc.run(caller, lambda: show_policy(svc.hsm).to_dict()))


async def audit_verify(request: web.Request) -> web.StreamResponse:
    from anyhsm.ops.admin import audit_verify as verify_chain

    svc, caller = await _caller(request, Op.ADMIN)
    res = await svc.run(caller, lambda: verify_chain(svc.hsm))
    return json_response(res.to_dict())


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/v1/health", Op.READ, health),
    Endpoint("GET", "/v1/ready", None, ready),
    Endpoint("GET", "/v1/keys", Op.READ, keys),
    Endpoint("GET", "/v1/keys/{key}", Op.READ, key_show),
    Endpoint("GET", "/v1/keys/{key}/xpub", Op.READ, xpub),
    Endpoint("GET", "/v1/keys/{key}/address", Op.READ, address),
    Endpoint("GET", "/v1/keys/{key}/descriptor", Op.READ, descriptor),
    Endpoint("GET", "/v1/keys/{key}/descriptors", Op.READ, descriptors),
    Endpoint("POST", "/v1/keys/{key}/descriptor-address", Op.READ, descriptor_address),
    Endpoint("POST", "/v1/keys/{key}/sign", Op.SIGN_DIGEST, sign),
    Endpoint("POST", "/v1/keys/{key}/sign-batch", Op.SIGN_DIGEST, sign_batch, idempotent=True),
    Endpoint("POST", "/v1/keys/{key}/verify", Op.READ, verify),
    Endpoint("POST", "/v1/psbt/sign", Op.SIGN_PSBT, psbt_sign, idempotent=True),
    Endpoint("POST", "/v1/psbt/finalize", Op.READ, psbt_finalize),
    Endpoint("POST", "/v1/psbt/inspect", Op.READ, psbt_inspect),
    Endpoint("GET", "/v1/policy", Op.ADMIN, policy_show),
    Endpoint("POST", "/v1/policy/check", Op.SIGN_PSBT, policy_check),
    Endpoint("POST", "/v1/policy/requests", Op.SIGN_PSBT, policy_request),
    Endpoint("POST", "/v1/policy/approvals", Op.APPROVE, policy_approve),
    Endpoint("POST", "/v1/message/sign", Op.SIGN_MESSAGE, message_sign),
    Endpoint("POST", "/v1/message/verify", Op.READ, message_verify),
    Endpoint("GET", "/v1/audit", Op.ADMIN, audit_tail),
    Endpoint("GET", "/v1/audit/verify", Op.ADMIN, audit_verify),
    Endpoint("GET", "/metrics", Op.READ, metrics),
    Endpoint("GET", "/openapi.json", None, openapi),
)


def add_routes(app: web.Application) -> None:
    for e in ENDPOINTS:
        app.router.add_route(e.method, e.path, e.handler)
