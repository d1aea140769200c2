"""/metrics: Prometheus text from prometheus-client in the service's own registry, with
the series the issue names; authenticated unless service.public_metrics; per-key series
only under the configured bound. And the optional extra stays optional: importing anyhsm
or its client loads neither aiohttp nor prometheus-client."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.bitcoin.test_signer import Spend, build_psbt
from tests.service.conftest import Running

from anyhsm.errors import Unauthenticated

DIGEST = hashlib.sha256(b"metrics").digest()


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_the_series_the_issue_names(service: Running) -> None:
    c = service.client("signer")
    c.sign("hot-1", DIGEST)
    c.sign_batch("hot-1", [DIGEST] * 3)
    w = service.wallet
    assert w is not None
    c.sign_psbt("w", build_psbt([Spend("p2wpkh", [w.key("m/84h/1h/0h/0/0")])]))
    with pytest.raises(Unauthenticated):
        service.client(None).list_keys()
    service.client(None).ready()
    m = families(service.client("reader").metrics())
    req = {(s["route"], s["status"]): v for s, v in m["anyhsm_http_requests_total"]}
    assert req[("/v1/keys/{key}/sign", "200")] == 1
    assert req[("/v1/keys", "401")] == 1
    sig = {(s["provider"], s["scheme"], s["outcome"]): v for s, v in m["anyhsm_signatures_total"]}
    assert sig[("software", "ecdsa", "ok")] == 4
    assert sig[("software", "psbt", "ok")] == 1
    assert any(s["operation"] == "sign" for s, _ in m["anyhsm_signing_duration_seconds_count"])
    assert [v for s, v in m["anyhsm_policy_decisions_total"] if s["decision"] == "allow"] == [1]
    assert m["anyhsm_provider_up"] == [({"provider": "software"}, 1.0)]
    assert m["anyhsm_active_provider_info"] == [
        ({"provider": "software", "security_level": "software"}, 1.0)
    ]
    assert m["anyhsm_fallback_active"] == [({}, 0.0)]
    assert m["anyhsm_audit_append_failures_total"] == [({}, 0.0)]
    assert m["anyhsm_audit_last_sequence"][0][1] > 0
    assert m["anyhsm_http_requests_in_flight"][0][1] >= 1  # this request
    assert m["anyhsm_build_info"][0][0]["version"] == "test"
    assert m["anyhsm_ready"] == [({}, 1.0)]
    keyed = {s["key"]: v for s, v in m["anyhsm_key_signatures_total"]}
    assert keyed[service.hsm.get_key("hot-1").id] == 4  # 5 keys < the default bound


def test_no_per_key_series_past_the_bound(start: Callable[..., Running]) -> None:
    r = start(metrics_max_keys=3)  # the deployment has 4 keys
    r.client("signer").sign("hot-1", DIGEST)
    assert "anyhsm_key_signatures_total{" not in r.client("reader").metrics()


def test_metrics_need_a_token_unless_public(start: Callable[..., Running]) -> None:
    r = start()
    with pytest.raises(Unauthenticated):
        r.client(None).metrics()
    public = start(public_metrics=True)
    assert "anyhsm_build_info" in public.client(None).metrics()


def test_importing_anyhsm_and_its_client_loads_no_server_dependency() -> None:
    code = (
        "import sys, anyhsm, anyhsm.client, anyhsm.service, anyhsm.cli.service_cmds;"
        "bad = [m for m in ('aiohttp', 'prometheus_client') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
