"""The SoftHSM2 token removed while the service serves it: signing answers 503 with the
provider's reason and readiness turns false (with the reason); when the token is back,
readiness recovers and signing works again. Real SoftHSM2, the token's directory moved
away and back (SoftHSM2 then behaves like a removed and re-inserted token)."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.service.conftest import CLIENTS, PASSPHRASE, make_settings, serve
from tests.support.softhsm import SoftHsmToken, token_subdir

from anyhsm import open_hsm
from anyhsm.client import Client
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import ProviderUnavailable
from anyhsm.hsm import Hsm
from anyhsm.secret import SecretBytes
from anyhsm.service.tokens import new_token

pytestmark = [
    pytest.mark.pkcs11,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
DIGEST = hashlib.sha256(b"token removed").digest()


@pytest.fixture
def pkcs11_hsm(
    tmp_path: Path, token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Hsm]:
    directory = tmp_path / "dep"
    init_deployment(directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    cfg = directory / "pkcs11.toml"
    cfg.write_text(
        'environment = "development"\nnetwork = "regtest"\n[fallback]\nchain = ["pkcs11"]\n'
        '[providers.software]\npath = "keystore"\n[audit]\npath = "audit.log"\n'
        f'[providers.pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\n'
    )
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    hsm = open_hsm(cfg)
    yield hsm
    hsm.close()


def wait_for(predicate: object, seconds: float = 20) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_token_removed_gives_503_and_not_ready_then_recovers(
    pkcs11_hsm: Hsm, token: SoftHsmToken, tmp_path: Path
) -> None:
    key = pkcs11_hsm.generate_key(f"hot-{time.monotonic_ns()}")
    tokens = {name: new_token() for name in CLIENTS}
    url, _, stop = serve(pkcs11_hsm, make_settings(tokens))
    signer = Client(url, tokens["admin"])
    public = Client(url)
    try:
        assert signer.sign(key.label, DIGEST)
        assert public.ready().ready
        src = token_subdir(token)
        parked = tmp_path / "parked-token"
        shutil.move(str(src), str(parked))
        try:
            with pytest.raises(ProviderUnavailable) as e:
                signer.sign(key.label, DIGEST)
            assert e.value.message
            status, _, headers = signer.request(
                "POST", f"/v1/keys/{key.label}/sign", {"digest": DIGEST.hex()}, accept=(503,)
            )
            assert status == 503 and headers["retry-after"] == "1"
            ready = public.ready()
            assert not ready.ready and ready.reasons and "pkcs11" in ready.reasons[0]
        finally:
            shutil.move(str(parked), str(src))
        wait_for(lambda: public.ready().ready)
        assert signer.sign(key.label, DIGEST)
    finally:
        signer.close()
        public.close()
        stop()
