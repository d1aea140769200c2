"""A typed Python client for the signing service (``anyhsm serve``, docs/service.md).

Standard library only (``http.client``): no extra is needed to call a service. One
:class:`Client` holds one keep-alive connection (use one per thread). Every failure is
raised as the :class:`~anyhsm.errors.HsmError` class the service named by its stable
code (:func:`anyhsm.errors.error_class_for_code`), so code written against the library
(``except KeyNotFound``) works unchanged against a service; transport failures are
:class:`~anyhsm.errors.ServiceUnreachable`.

    from anyhsm.client import Client
    with Client("http://127.0.0.1:8420", token) as c:
        sig = c.sign("hot-1", digest)
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import (
    HsmError,
    PolicyViolation,
    ServiceError,
    ServiceUnreachable,
    error_class_for_code,
)
from anyhsm.types import KeyInfo, KeyType, Network, SecurityLevel, SigScheme

if TYPE_CHECKING:
    from anyhsm.audit import VerifyResult
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.hsm import HealthReport
    from anyhsm.ops.bitcoin import (
        AddressResult,
        DescriptorResult,
        MessageSignature,
        MessageVerification,
        WalletDescriptors,
        XpubResult,
    )
    from anyhsm.ops.policy import ApprovalAccepted, ApprovalRequest, PolicyCheck, PolicyShow

JsonObject = Mapping[str, object]
DEFAULT_ADDR = "http://127.0.0.1:8420"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]
    active_provider: str
    security_level: str


@dataclass(frozen=True)
class SignedPsbt:
    """What ``POST /v1/psbt/sign`` answered: the signed PSBT and the signer's report
    (``report`` is the whole object ``anyhsm psbt sign --json`` prints)."""

    psbt: Psbt
    signed_inputs: int
    signatures: int
    unsigned_inputs: int
    fee: int
    vsize: int
    fee_rate: float
    warnings: tuple[str, ...]
    report: JsonObject
    replayed: bool = False  # the stored answer to an earlier request with this Idempotency-Key


@dataclass(frozen=True)
class FinalizedPsbt:
    psbt: Psbt
    complete: bool
    tx: bytes | None
    txid: str | None
    report: JsonObject


@dataclass(frozen=True)
class AuditTail:
    verified: bool
    verify: VerifyResult
    entries: tuple[JsonObject, ...]


def raise_error(status: int, body: bytes, retry_after: str | None = None) -> None:
    """Raise the error a service answered with, as its library class."""
    try:
        obj = json.loads(body)
        err = obj["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        raise ServiceUnreachable(
            f"the service answered HTTP {status} without an anyhsm error object",
            hint="is the address that of an anyhsm service (and not a proxy's error page)?",
        ) from None
    cls = error_class_for_code(code)
    exc = cls.__new__(cls)
    hint = err.get("hint")
    HsmError.__init__(exc, message, hint=hint if isinstance(hint, str) else None)
    details = err.get("details")
    if isinstance(details, list):
        exc.details = [d for d in details if isinstance(d, dict)]
    rules = err.get("rules")
    if isinstance(exc, PolicyViolation) and isinstance(rules, list):
        exc._rules = tuple(str(r) for r in rules)  # the refusing rules, as the service named them
    if isinstance(exc, ServiceError):
        exc.retry_after = _float(retry_after)
    raise exc


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def key_info(obj: JsonObject) -> KeyInfo:
    """A :class:`KeyInfo` from the service's JSON for a key."""
    chain = obj.get("chain_code")
    return KeyInfo(
        id=_s(obj, "id"),
        label=_s(obj, "label"),
        provider=_s(obj, "provider"),
        public_key=bytes.fromhex(_s(obj, "public_key")),
        key_type=KeyType(_s(obj, "key_type")),
        store=str(obj.get("store") or ""),
        exportable=bool(obj.get("exportable", False)),
        created_at=str(obj.get("created_at") or ""),
        chain_code=bytes.fromhex(chain) if isinstance(chain, str) else None,
        available=bool(obj.get("available", True)),
    )


def _s(obj: JsonObject, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ServiceUnreachable(f"the service's answer lacks the string {name!r}")
    return value


def _ns(obj: JsonObject, name: str) -> str | None:
    value = obj.get(name)
    return value if isinstance(value, str) else None


def _i(obj: JsonObject, name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServiceUnreachable(f"the service's answer lacks the integer {name!r}")
    return value


def _obj(value: object) -> JsonObject:
    if not isinstance(value, dict):
        raise ServiceUnreachable("the service's answer is not a JSON object")
    return value


def _ni(obj: JsonObject, name: str) -> int | None:
    return None if obj.get(name) is None else _i(obj, name)


def _list(obj: JsonObject, name: str) -> list[object]:
    value = obj.get(name)
    if not isinstance(value, list):
        raise ServiceUnreachable(f"the service's answer lacks the list {name!r}")
    return value


def _strings(obj: JsonObject, name: str) -> tuple[str, ...]:
    items = _list(obj, name)
    if not all(isinstance(v, str) for v in items):
        raise ServiceUnreachable(f"the service's answer has a {name!r} that is not all strings")
    return tuple(str(v) for v in items)


def _hex(text: str, name: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ServiceUnreachable(f"the service's answer has a {name!r} that is not hex") from None


def policy_check_result(obj: JsonObject) -> PolicyCheck:
    """:meth:`Client.check_policy`'s answer as the operation's result (what ``anyhsm
    policy check`` prints under ``--addr``); :class:`ServiceUnreachable` when the answer
    is not one."""
    from anyhsm.ops.policy import PolicyCheck, RuleVerdict

    rules = []
    for r in map(_obj, _list(obj, "rules")):
        approvers = _strings(r, "approved_by") if r.get("approved_by") is not None else ()
        rules.append(
            RuleVerdict(
                _s(r, "name"),
                _s(r, "decision"),
                _s(r, "reason"),
                tuple(_hex(a, "approved_by") for a in approvers),
            )
        )
    return PolicyCheck(
        decision=_s(obj, "decision"),
        txid=_s(obj, "txid"),
        policy=_ns(obj, "policy"),
        keys=_strings(obj, "keys"),
        amount=_ni(obj, "amount"),
        fee=_ni(obj, "fee"),
        rules=tuple(rules),
        budgets=tuple(dict(_obj(b)) for b in _list(obj, "budgets")),
        warnings=_strings(obj, "warnings"),
    )


def policy_show_result(obj: JsonObject) -> PolicyShow:
    """:meth:`Client.show_policy`'s answer as the operation's result (what ``anyhsm
    policy show`` prints under ``--addr``); :class:`ServiceUnreachable` when the answer
    is not one."""
    from anyhsm.ops.policy import BudgetNow, FrozenKey, PendingApproval, PolicyShow

    active = obj.get("active")
    if not isinstance(active, bool):
        raise ServiceUnreachable("the service's answer lacks the boolean 'active'")
    required = _ns(obj, "required_file")
    principals = _obj(obj.get("principals"))
    return PolicyShow(
        active=active,
        sha256=_ns(obj, "sha256"),
        version=_ni(obj, "version"),
        required_file=None if required is None else Path(required),
        description=_s(obj, "description"),
        rules=tuple(dict(_obj(r)) for r in _list(obj, "rules")),
        principals={k: list(_strings(principals, k)) for k in principals},
        budgets=tuple(
            BudgetNow(_s(b, "rule"), _s(b, "period"), _i(b, "limit"), _i(b, "used"), _i(b, "left"))
            for b in map(_obj, _list(obj, "budgets"))
        ),
        frozen=tuple(
            FrozenKey(_s(f, "key"), _s(f, "label"), _s(f, "reason"), _i(f, "since"), _ns(f, "by"))
            for f in map(_obj, _list(obj, "frozen"))
        ),
        pending_approvals=tuple(
            PendingApproval(
                _s(a, "id"),
                _s(a, "txid"),
                _hex(_s(a, "pubkey"), "pubkey"),
                _i(a, "expires"),
                _ns(a, "submitted_by"),
            )
            for a in map(_obj, _list(obj, "pending_approvals"))
        ),
        builtin_rules=tuple(dict(_obj(r)) for r in _list(obj, "builtin_rules")),
    )


def _psbt_text(psbt: Psbt | bytes | str) -> str:
    if isinstance(psbt, str):
        return psbt.strip()
    if isinstance(psbt, bytes):
        return base64.b64encode(psbt).decode()
    return psbt.to_base64()


def _derive(body: dict[str, object], path: str | None, tweak: bytes | None) -> dict[str, object]:
    """A digest request with its optional ``path`` and ``tweak`` members."""
    if path is not None:
        body["path"] = path
    if tweak is not None:
        body["tweak"] = tweak.hex()
    return body


def _key_selection(key: str | Sequence[str] | None) -> dict[str, object]:
    """``key``, ``keys`` or ``all_keys`` of ``POST /v1/psbt/sign``."""
    if key is None:
        return {"all_keys": True}
    if isinstance(key, str):
        return {"key": key}
    return {"keys": list(key)}


class Client:
    """One connection to a signing service at ``url`` (``http://`` or ``https://``),
    authenticating with ``token`` (default ``ANYHSM_TOKEN``). For https: ``cafile`` (the
    service's CA), and for mutual TLS ``certfile``/``keyfile``; or a whole ``ssl_context``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        cafile: str | Path | None = None,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = url or os.environ.get("ANYHSM_ADDR") or DEFAULT_ADDR
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceUnreachable(f"not a service address: {url!r}", hint="http://HOST:PORT")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._token = token if token is not None else os.environ.get("ANYHSM_TOKEN")
        self._timeout = timeout
        if self._https and ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            if certfile is not None:
                ssl_context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
        self._ssl = ssl_context
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __repr__(self) -> str:  # never the token
        return f"<anyhsm.client.Client {self.url}>"

    # --- transport ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: tuple[int, ...] = (),
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One request; (status, body, headers). Raises the service's error for any
        status >= 400 but those in ``accept``, ServiceUnreachable when there is no answer.
        A keep-alive connection the server closed meanwhile is reopened once, for a
        request it had not answered."""
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        path = urllib.parse.quote(path, safe="/%:@!$&'()*+,;=-._~")  # non-ASCII as UTF-8
        target = self._prefix + path + (("?" + urllib.parse.urlencode(q)) if q else "")
        h = {"Accept": "application/json", **(headers or {})}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            h["Content-Type"] = "application/json"
        status, payload, headers_out = self._send(method, target, data, h)
        if status >= 400 and status not in accept:
            raise_error(status, payload, headers_out.get("retry-after"))
        return status, payload, headers_out

    def _send(
        self, method: str, target: str, data: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        """The exchange itself: (status, body, headers with lower-case names)."""
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                conn = self._connection()
                try:
                    conn.request(method, target, body=data, headers=dict(headers))
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    self._drop()
                    if reused and attempt == 0:
                        continue
                    raise ServiceUnreachable(f"cannot reach {self.url}: {e}") from None
                try:
                    resp = conn.getresponse()
                    payload = resp.read()
                except http.client.RemoteDisconnected:
                    # closed before answering: on a reused keep-alive connection, the
                    # server closed it while idle and never read the request: once more
                    self._drop()
                    if reused and attempt == 0:
                        continue
                    raise ServiceUnreachable(f"{self.url} closed the connection") from None
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    self._drop()
                    raise ServiceUnreachable(f"no answer from {self.url}: {e}") from None
                if resp.getheader("Connection", "").lower() == "close":
                    self._drop()
                return resp.status, payload, {k.lower(): v for k, v in resp.getheaders()}
        raise ServiceUnreachable(f"cannot reach {self.url}")  # pragma: no cover

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _json(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> JsonObject:
        _, payload, _ = self.request(method, path, body, query=query, headers=headers)
        try:
            return _obj(json.loads(payload))
        except ValueError:
            raise ServiceUnreachable("the service's answer is not JSON") from None

    @staticmethod
    def _key(key: str) -> str:
        return urllib.parse.quote(key, safe="")

    # --- public and read ------------------------------------------------------------------

    def ready(self) -> Readiness:
        """Readiness; a service that is not ready answers 503 with the same object."""
        _, payload, _ = self.request("GET", "/v1/ready", accept=(503,))
        try:
            obj = _obj(json.loads(payload))
        except ValueError:
            raise ServiceUnreachable("the service's answer is not JSON") from None
        reasons = obj.get("reasons")
        return Readiness(
            bool(obj.get("ready")),
            tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
            _s(obj, "active_provider"),
            _s(obj, "security_level"),
        )

    def health(self) -> HealthReport:
        """The health report (``anyhsm health --json``), as the library's HealthReport."""
        from anyhsm.hsm import HealthReport

        obj = self._json("GET", "/v1/health")
        level, minimum = _ns(obj, "security_level"), _ns(obj, "min_security_level")
        providers = obj.get("providers")
        reasons = obj.get("degraded_reasons")
        error = obj.get("error")
        return HealthReport(
            ok=bool(obj.get("ok")),
            active_provider=_ns(obj, "active_provider"),
            security_level=SecurityLevel.parse(level) if level else None,
            min_security_level=SecurityLevel.parse(minimum) if minimum else None,
            environment=_ns(obj, "environment"),
            network=_ns(obj, "network"),
            providers=[dict(p) for p in providers if isinstance(p, dict)]
            if isinstance(providers, list)
            else [],
            audit=dict(_obj(obj.get("audit", {}))),
            process=dict(_obj(obj.get("process", {}))),
            degraded_reasons=[
                {str(k): str(v) for k, v in r.items()} for r in reasons if isinstance(r, dict)
            ]
            if isinstance(reasons, list)
            else [],
            error=dict(error) if isinstance(error, dict) else None,
        )

    def list_keys(self) -> list[KeyInfo]:
        keys = self._json("GET", "/v1/keys").get("keys")
        return [key_info(_obj(k)) for k in keys] if isinstance(keys, list) else []

    def get_key(self, key: str) -> KeyInfo:
        return key_info(self._json("GET", f"/v1/keys/{self._key(key)}"))

    def public_key(self, key: str) -> bytes:
        return self.get_key(key).public_key

    def xpub(self, key: str, path: str | None = None, *, slip132: str | None = None) -> XpubResult:
        from anyhsm.ops.bitcoin import XpubResult

        obj = self._json(
            "GET", f"/v1/keys/{self._key(key)}/xpub", query={"path": path, "slip132": slip132}
        )
        return XpubResult(
            xpub=_s(obj, "xpub"),
            key=_s(obj, "key"),
            path=_s(obj, "path"),
            master_fingerprint=_s(obj, "master_fingerprint"),
            origin=_s(obj, "origin"),
            network=Network(_s(obj, "network")),
        )

    def address(self, key: str, path: str | None = None, *, kind: str = "p2wpkh") -> AddressResult:
        from anyhsm.bitcoin.address import AddressKind
        from anyhsm.ops.bitcoin import AddressResult

        obj = self._json(
            "GET", f"/v1/keys/{self._key(key)}/address", query={"path": path, "type": kind}
        )
        return AddressResult(
            address=_s(obj, "address"),
            type=AddressKind(_s(obj, "type")),
            key=_s(obj, "key"),
            path=_ns(obj, "path"),
            public_key=bytes.fromhex(_s(obj, "public_key")),
            script_pubkey=bytes.fromhex(_s(obj, "script_pubkey")),
            network=Network(_s(obj, "network")),
        )

    def descriptor(
        self, key: str, descriptor_type: str = "wpkh", *, account: int = 0
    ) -> DescriptorResult:
        obj = self._json(
            "GET",
            f"/v1/keys/{self._key(key)}/descriptor",
            query={"type": descriptor_type, "account": account},
        )
        return _descriptor(obj)

    def wallet_descriptors(self, key: str, *, account: int = 0) -> WalletDescriptors:
        from anyhsm.ops.bitcoin import DescriptorType, RefusedType, WalletDescriptors

        obj = self._json(
            "GET", f"/v1/keys/{self._key(key)}/descriptors", query={"account": account}
        )
        made = obj.get("descriptors")
        refused = obj.get("refused")
        return WalletDescriptors(
            key=_s(obj, "key"),
            account=_i(obj, "account"),
            master_fingerprint=_ns(obj, "master_fingerprint"),
            descriptors=tuple(_descriptor(_obj(d)) for d in made) if isinstance(made, list) else (),
            refused=tuple(
                RefusedType(DescriptorType(_s(_obj(r), "type")), _s(_obj(r), "reason"))
                for r in refused
            )
            if isinstance(refused, list)
            else (),
        )

    def descriptor_address(self, key: str, descriptor: str) -> str:
        """The address of a one-address descriptor of ``key`` (Core's ``displayaddress``):
        DescriptorError unless its fingerprint and key are the key's, at a path the
        service's signing policy signs."""
        obj = self._json(
            "POST", f"/v1/keys/{self._key(key)}/descriptor-address", {"descriptor": descriptor}
        )
        return _s(obj, "address")

    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: str | None = None,
        tweak: bytes | None = None,
    ) -> bool:
        """Whether ``signature`` verifies under the key (or its child at ``path``,
        tweaked by ``tweak``)."""
        body: dict[str, object] = {
            "digest": digest.hex(),
            "signature": signature.hex(),
            "scheme": scheme.value,
        }
        obj = self._json("POST", f"/v1/keys/{self._key(key)}/verify", _derive(body, path, tweak))
        return obj.get("valid") is True

    # --- signing ---------------------------------------------------------------------------

    def sign(
        self,
        key: str,
        digest: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: str | None = None,
        tweak: bytes | None = None,
    ) -> bytes:
        """Strict DER low-S ECDSA, or a 64-byte BIP340 signature, of a 32-byte digest, by
        the key or (HD keys) its child at ``path`` (``m/84'/1'/0'/0/5``); ``tweak``: a
        32-byte BIP341 tweak applied first (schnorr)."""
        body: dict[str, object] = {"digest": digest.hex(), "scheme": scheme.value}
        obj = self._json("POST", f"/v1/keys/{self._key(key)}/sign", _derive(body, path, tweak))
        return bytes.fromhex(_s(obj, "signature"))

    def sign_batch(
        self,
        key: str,
        digests: Sequence[bytes],
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        idempotency_key: str | None = None,
        path: str | None = None,
        tweak: bytes | None = None,
    ) -> list[bytes | HsmError]:
        """One result per digest, in order: its signature, or the error for that item
        (by the key, or its child at ``path``, tweaked by ``tweak``, as :meth:`sign`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body: dict[str, object] = {"digests": [d.hex() for d in digests], "scheme": scheme.value}
        obj = self._json(
            "POST",
            f"/v1/keys/{self._key(key)}/sign-batch",
            _derive(body, path, tweak),
            headers=headers,
        )
        results = obj.get("results")
        if not isinstance(results, list) or len(results) != len(digests):
            raise ServiceUnreachable("the service's batch answer has the wrong number of results")
        out: list[bytes | HsmError] = []
        for item in results:
            item = _obj(item)
            sig = item.get("signature")
            if isinstance(sig, str):
                out.append(bytes.fromhex(sig))
                continue
            try:
                raise_error(200, json.dumps({"error": item.get("error")}).encode())
            except HsmError as e:
                out.append(e)
        return out

    def sign_many(
        self, key: str, digests: Sequence[bytes], scheme: SigScheme = SigScheme.ECDSA
    ) -> list[bytes]:
        """Like :meth:`Hsm.sign_many`: every signature, or the first item's error raised."""
        out: list[bytes] = []
        for r in self.sign_batch(key, digests, scheme):
            if isinstance(r, HsmError):
                raise r
            out.append(r)
        return out

    def sign_psbt(
        self,
        key: str | Sequence[str] | None,
        psbt: Psbt | bytes | str,
        *,
        idempotency_key: str | None = None,
    ) -> SignedPsbt:
        """Sign under the service's signing policy (what ``anyhsm psbt sign`` does) with
        ``key`` (a label or id), several keys (one policy decision and audit entry for
        them all), or None: every key this client may use (``--all-keys``)."""
        from anyhsm.bitcoin.psbt import Psbt

        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {**_key_selection(key), "psbt": _psbt_text(psbt)}
        _, payload, h = self.request("POST", "/v1/psbt/sign", body, headers=headers)
        obj = _obj(json.loads(payload))
        warnings = obj.get("warnings")
        fee_rate = obj.get("fee_rate")
        return SignedPsbt(
            psbt=Psbt.parse(_s(obj, "psbt")),
            signed_inputs=_i(obj, "signed_inputs"),
            signatures=_i(obj, "signatures"),
            unsigned_inputs=_i(obj, "unsigned_inputs"),
            fee=_i(obj, "fee"),
            vsize=_i(obj, "vsize"),
            fee_rate=float(fee_rate) if isinstance(fee_rate, int | float) else 0.0,
            warnings=tuple(str(w) for w in warnings) if isinstance(warnings, list) else (),
            report=obj,
            replayed=h.get("idempotent-replayed") == "true",
        )

    def finalize_psbt(self, psbt: Psbt | bytes | str) -> FinalizedPsbt:
        from anyhsm.bitcoin.psbt import Psbt

        obj = self._json("POST", "/v1/psbt/finalize", {"psbt": _psbt_text(psbt)})
        tx = _ns(obj, "tx")
        return FinalizedPsbt(
            psbt=Psbt.parse(_s(obj, "psbt")),
            complete=obj.get("complete") is True,
            tx=bytes.fromhex(tx) if tx else None,
            txid=_ns(obj, "txid"),
            report=obj,
        )

    def inspect_psbt(self, psbt: Psbt | bytes | str) -> JsonObject:
        """What ``anyhsm psbt inspect --json`` prints."""
        return self._json("POST", "/v1/psbt/inspect", {"psbt": _psbt_text(psbt)})

    def sign_message(
        self,
        key: str,
        message: str,
        path: str | None = None,
        *,
        kind: str | None = None,
        bip322: bool = False,
        bip322_format: str | None = None,
        prefix: bool = True,
        nonce: str = "low-r",
    ) -> MessageSignature:
        from anyhsm.bitcoin.address import AddressKind
        from anyhsm.bitcoin.bip322 import Bip322Format
        from anyhsm.bitcoin.message import EcdsaNonce
        from anyhsm.ops.bitcoin import MessageSignature

        obj = self._json(
            "POST",
            "/v1/message/sign",
            {
                "key": key,
                "message": message,
                "path": path,
                "type": kind,
                "bip322": bip322,
                "bip322_format": bip322_format,
                "prefix": prefix,
                "nonce": nonce,
            },
        )
        fmt, used = _ns(obj, "bip322_format"), _ns(obj, "nonce")
        return MessageSignature(
            signature=_s(obj, "signature"),
            address=_s(obj, "address"),
            type=AddressKind(_s(obj, "type")),
            format=_s(obj, "format"),
            key=_s(obj, "key"),
            path=_ns(obj, "path"),
            bip322_format=Bip322Format(fmt) if fmt else None,
            nonce=EcdsaNonce(used) if used else None,
        )

    def verify_message(self, address: str, message: str, signature: str) -> MessageVerification:
        from anyhsm.ops.bitcoin import MessageVerification, ProvenOutput

        obj = self._json(
            "POST",
            "/v1/message/verify",
            {"address": address, "message": message, "signature": signature},
        )
        proven = obj.get("proven")
        err = obj.get("error")
        error: HsmError | None = None
        if isinstance(err, dict):
            try:
                raise_error(200, json.dumps({"error": err}).encode())
            except HsmError as e:
                error = e
        lock, seq = obj.get("locktime"), obj.get("sequence")
        return MessageVerification(
            valid=obj.get("valid") is True,
            address=_s(obj, "address"),
            network=Network(_s(obj, "network")),
            format=_s(obj, "format"),
            state=_s(obj, "state"),
            reason=_ns(obj, "reason"),
            bip322_format=_ns(obj, "bip322_format"),
            locktime=lock if isinstance(lock, int) else None,
            sequence=seq if isinstance(seq, int) else None,
            proven=tuple(
                ProvenOutput(
                    _s(_obj(p), "txid"),
                    _i(_obj(p), "vout"),
                    _i(_obj(p), "amount"),
                    bytes.fromhex(_s(_obj(p), "script_pubkey")),
                )
                for p in proven
            )
            if isinstance(proven, list)
            else (),
            error=error,
        )

    # --- spending policy ---------------------------------------------------------------------

    def show_policy(self) -> JsonObject:
        """What ``anyhsm policy show --json`` prints: the active spending policy, its
        budgets, frozen keys and approvals waiting (right ``admin``);
        :func:`policy_show_result` reads it into the operation's result."""
        return self._json("GET", "/v1/policy", None)

    def check_policy(self, key: str, psbt: Psbt | bytes | str) -> JsonObject:
        """What ``anyhsm policy check --json`` prints: the spending policy's decision on
        the PSBT signed by ``key``, nothing signed or debited; :func:`policy_check_result`
        reads it into the operation's result."""
        return self._json("POST", "/v1/policy/check", {"key": key, "psbt": _psbt_text(psbt)})

    def approval_request(
        self, key: str, psbt: Psbt | bytes | str, *, expires_in: int = 3600
    ) -> ApprovalRequest:
        """``anyhsm policy request``: the exact message approvers sign for the PSBT under
        the active policy (valid ``expires_in`` seconds), and the rules that want them."""
        from anyhsm.ops.policy import ApprovalRequest

        obj = self._json(
            "POST",
            "/v1/policy/requests",
            {"key": key, "psbt": _psbt_text(psbt), "expires_in": expires_in},
        )
        rules = obj.get("rules")
        return ApprovalRequest(
            txid=_s(obj, "txid"),
            policy=_s(obj, "policy"),
            expires=_i(obj, "expires"),
            message=_s(obj, "message"),
            rules=tuple(dict(_obj(r)) for r in rules) if isinstance(rules, list) else (),
        )

    def submit_approval(
        self,
        txid: str,
        pubkey: str,
        signature: str,
        expires: int,
        *,
        policy: str | None = None,
    ) -> ApprovalAccepted:
        """``anyhsm policy approve``: one approver's signature over the request's message
        (BIP137 or BIP322, base64), kept until used or expired (right ``approve``)."""
        from anyhsm.ops.policy import ApprovalAccepted

        body: dict[str, object] = {
            "txid": txid,
            "pubkey": pubkey,
            "signature": signature,
            "expires": expires,
        }
        if policy is not None:
            body["policy"] = policy
        obj = self._json("POST", "/v1/policy/approvals", body)
        rules = obj.get("rules")
        return ApprovalAccepted(
            id=_s(obj, "id"),
            txid=_s(obj, "txid"),
            policy=_s(obj, "policy"),
            pubkey=bytes.fromhex(_s(obj, "pubkey")),
            expires=_i(obj, "expires"),
            rules=tuple(str(r) for r in rules) if isinstance(rules, list) else (),
        )

    # --- admin -----------------------------------------------------------------------------

    def verify_audit(self) -> VerifyResult:
        return _verify_result(self._json("GET", "/v1/audit/verify"))

    def audit_tail(
        self,
        limit: int = 100,
        *,
        op: str | None = None,
        key: str | None = None,
        outcome: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> AuditTail:
        obj = self._json(
            "GET",
            "/v1/audit",
            query={
                "limit": limit,
                "op": op,
                "key": key,
                "outcome": outcome,
                "since": since,
                "until": until,
            },
        )
        entries = obj.get("entries")
        summary = _obj(obj.get("summary"))
        return AuditTail(
            verified=summary.get("verified") is True,
            verify=_verify_result(_obj(summary.get("verify"))),
            entries=tuple(_obj(e) for e in entries) if isinstance(entries, list) else (),
        )

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        _, payload, _ = self.request("GET", "/metrics")
        return payload.decode()


def _descriptor(obj: JsonObject) -> DescriptorResult:
    from anyhsm.ops.bitcoin import DescriptorResult, DescriptorType

    account = obj.get("account")
    return DescriptorResult(
        descriptor=_s(obj, "descriptor"),
        type=DescriptorType(_s(obj, "type")),
        key=_s(obj, "key"),
        account=account if isinstance(account, int) else None,
        receive=_ns(obj, "receive"),
        change=_ns(obj, "change"),
        origin=_ns(obj, "origin"),
        master_fingerprint=_ns(obj, "master_fingerprint"),
    )


def _verify_result(obj: JsonObject) -> VerifyResult:
    from anyhsm.audit import VerifyResult

    bad, cp = obj.get("first_bad_line"), obj.get("checkpoint_seq")
    return VerifyResult(
        ok=obj.get("ok") is True,
        entries=_i(obj, "entries"),
        first_bad_line=bad if isinstance(bad, int) else None,
        reason=str(obj.get("reason") or ""),
        checkpoint_seq=cp if isinstance(cp, int) else None,
        chain=_i(obj, "chain"),
    )
