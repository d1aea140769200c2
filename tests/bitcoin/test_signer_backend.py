"""The PSBT signer needs only the SigningBackend Protocol (issue 10): a minimal backend
written here over a real SoftwareProvider (its keystore on disk, its libsecp256k1
signatures; no handle, no configuration, no audit log) signs PSBTs that Bitcoin Core's
interpreter accepts, with the policy and network given as arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from tests.bitcoin.kernel import assert_final_spends
from tests.bitcoin.test_signer import PASSPHRASE, Spend, Wallet, build_psbt

from anyhsm.bitcoin import SigningPolicyError, finalize_psbt
from anyhsm.bitcoin.backend import SigningBackend, SignRequest
from anyhsm.bitcoin.signer import sign_psbt
from anyhsm.config import PolicyConfig
from anyhsm.deploy import FAST_DEV_KDF
from anyhsm.errors import ProviderUnavailable
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.software import SoftwareProvider
from anyhsm.secret import SecretBytes
from anyhsm.types import (
    Capabilities,
    DerivedPublicKey,
    Environment,
    KeyInfo,
    KeyRef,
    KeyType,
    Network,
)

SEED = bytes(range(32))


class ProviderBackend:
    """Six methods over one provider, nothing else: what the signer may rely on."""

    def __init__(self, provider: SoftwareProvider) -> None:
        self.provider = provider
        self.events: list[tuple[str, str, dict[str, str]]] = []
        self.batches: list[int] = []

    def get_key(self, key: KeyRef) -> KeyInfo:
        return self.provider.get_key(key)

    def list_keys(self) -> list[KeyInfo]:
        return [k for k in self.provider.list_keys() if not k.internal]

    def capabilities(self, key: KeyRef) -> Capabilities:
        return self.provider.capabilities()

    def derive_public(self, key: KeyRef, path: tuple[int, ...]) -> DerivedPublicKey:
        return self.provider.derive_public(key, path)

    def sign_many(
        self,
        key: KeyRef,
        requests: Sequence[SignRequest],
        *,
        context: Mapping[str, str] | None = None,
    ) -> list[bytes]:
        self.batches.append(len(requests))
        return self.provider.sign_batch(key, requests)

    def record_event(
        self,
        op: str,
        outcome: str,
        detail: dict[str, str] | None = None,
        *,
        key_id: str | None = None,
        provider: str | None = None,
        error: str | None = None,
    ) -> None:
        self.events.append((op, outcome, dict(detail or {})))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProviderBackend]:
    passphrase = SecretBytes(PASSPHRASE.encode())
    Keystore.create(tmp_path / "keystore", passphrase, kdf=FAST_DEV_KDF).close()
    ctx = ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=tmp_path,
        software_settings={"path": "keystore"},
        passphrase=passphrase,
    )
    provider = SoftwareProvider(ctx)
    provider.open()
    with SecretBytes(SEED) as seed:
        provider.import_key("w", seed, KeyType.BIP32)
    yield ProviderBackend(provider)
    provider.close()


def test_a_provider_backend_is_a_signing_backend(backend: ProviderBackend) -> None:
    as_protocol: SigningBackend = backend  # mypy checks the shape, as it does for Hsm
    assert as_protocol is backend


def test_sign_through_the_protocol_only(backend: ProviderBackend) -> None:
    w = Wallet("w", SEED)
    spends = [
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
        Spend("p2tr", [w.key("m/86'/1'/0'/0/0")]),
        Spend("p2sh-p2wpkh", [w.key("m/49'/1'/0'/0/0")]),
        Spend("p2pkh", [w.key("m/44'/1'/0'/0/0")]),
    ]
    psbt = build_psbt(spends)
    res = sign_psbt(backend, psbt, "w", policy=PolicyConfig(), network=Network.REGTEST)
    assert res.signed_inputs == 4
    assert backend.batches == [4]  # one batch for the key
    assert_final_spends(finalize_psbt(res.psbt))
    ((op, outcome, detail),) = backend.events
    assert (op, outcome) == ("psbt_sign", "ok")
    assert detail["inputs"] == "0,1,2,3" and detail["txid"] == psbt.unsigned_tx().txid_hex()


def test_the_network_is_the_callers(backend: ProviderBackend) -> None:
    """The same PSBT under mainnet: its testnet coin-type paths are not allowed inputs."""
    w = Wallet("w", SEED)
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(backend, psbt, "w", policy=PolicyConfig(), network=Network.MAINNET)
    assert {d["rule"] for d in e.value.details} == {"input-path"}
    assert backend.events[-1][:2] == ("psbt_sign", "refused")
    assert backend.batches == []  # refused before any signature


def test_the_policy_is_the_callers(backend: ProviderBackend) -> None:
    w = Wallet("w", SEED)
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])], fee=50_000)
    low = PolicyConfig(max_fee_sat=10_000)
    with pytest.raises(SigningPolicyError):
        sign_psbt(backend, psbt, "w", policy=low, network=Network.REGTEST)
    ok = sign_psbt(backend, psbt, "w", policy=PolicyConfig(), network=Network.REGTEST)
    assert ok.fee == 50_000


def test_the_previous_tx_relaxation_holds_only_outside_production(
    backend: ProviderBackend,
) -> None:
    """``require_previous_tx_segwit_v0 = false`` is for test set-ups: without an
    environment the signer takes the strict (production) reading."""
    w = Wallet("w", SEED)
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")], non_witness=False)])
    relaxed = dataclasses.replace(PolicyConfig(), require_previous_tx_segwit_v0=False)
    for environment in (None, Environment.PRODUCTION):
        with pytest.raises(SigningPolicyError) as e:
            if environment is None:
                sign_psbt(backend, psbt, "w", policy=relaxed, network=Network.REGTEST)
            else:
                sign_psbt(
                    backend,
                    psbt,
                    "w",
                    policy=relaxed,
                    network=Network.REGTEST,
                    environment=environment,
                )
        assert [d["rule"] for d in e.value.details] == ["missing-previous-tx"]
    res = sign_psbt(
        backend,
        psbt,
        "w",
        policy=relaxed,
        network=Network.REGTEST,
        environment=Environment.DEVELOPMENT,
    )
    assert res.signed_inputs == 1


def test_keys_the_backend_cannot_use_now_are_skipped(backend: ProviderBackend) -> None:
    """A key the directory lists as unavailable (its store is not open here) is not
    asked anything when signing with every key."""

    class WithAbsentKey(ProviderBackend):
        def list_keys(self) -> list[KeyInfo]:
            absent = KeyInfo("absent-id", "absent", "pkcs11", bytes(33), available=False)
            return [*super().list_keys(), absent]

        def capabilities(self, key: KeyRef) -> Capabilities:
            if key == "absent-id":
                raise ProviderUnavailable("pkcs11", "not open here")
            return super().capabilities(key)

    w = Wallet("w", SEED)
    other = WithAbsentKey(backend.provider)
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])])
    res = sign_psbt(other, psbt, policy=PolicyConfig(), network=Network.REGTEST)
    assert res.signed_inputs == 1
