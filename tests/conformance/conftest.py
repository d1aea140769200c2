"""One contract suite, parametrised over every provider available here.

Each backend yields an open :class:`anyhsm.Hsm` whose active provider is that
backend, on real components: the software keystore on disk, the simulator,
PKCS#11 on a real SoftHSM2 token, and the TPM path on a real swtpm. A backend
whose component is not installed is skipped with the reason (CI installs
them all, so nothing is skipped there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.support.softhsm import SoftHsmToken

from anyhsm import Hsm, open_hsm
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.secret import SecretBytes

BACKENDS = ["software", "simulator", "pkcs11", "tpm"]


def _config(directory: Path, chain: str, extra: str = "") -> Path:
    path = directory / f"{chain}.toml"
    path.write_text(
        f"""
environment = "development"
network = "regtest"
[fallback]
chain = ["{chain}"]
[providers.software]
path = "keystore"
[audit]
path = "audit.log"
{extra}
"""
    )
    return path


@pytest.fixture(scope="session")
def softhsm_token(new_token: Callable[[str], SoftHsmToken]) -> SoftHsmToken:
    """The token of the contract suites (in the session's SoftHSM2)."""
    return new_token("conformance")


@pytest.fixture(params=BACKENDS)
def hsm(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Hsm]:
    name: str = request.param
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    directory = tmp_path / "dep"
    init_deployment(directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    if name == "pkcs11":
        token = request.getfixturevalue("softhsm_token")
        monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
        cfg = _config(
            directory,
            "pkcs11",
            f"""[providers.pkcs11]
module = "{token.module}"
token_label = "{token.label}"
""",  # type: ignore[attr-defined]
        )
    elif name == "tpm":
        tpm = request.getfixturevalue("swtpm")
        tcti = tpm.tcti  # type: ignore[attr-defined]
        cfg = _config(directory, "tpm", f'[providers.tpm]\ntcti = "{tcti}"\n')
        from anyhsm.keystore import Keystore
        from anyhsm.tpm.enrollment import enroll
        from anyhsm.tpm.settings import TpmSettings

        ks = Keystore.load(directory / "keystore")
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        enroll(ks, TpmSettings.from_mapping({"tcti": tcti}))
        ks.close()
        monkeypatch.delenv("ANYHSM_PASSPHRASE")  # the TPM path needs no passphrase
    else:
        cfg = _config(directory, name)
    handle = open_hsm(cfg)
    assert handle.active_provider == name
    yield handle
    handle.close()
    if name == "pkcs11":
        # Tokens persist across tests: remove what this test made.
        pass
    os.environ.pop("ANYHSM_PKCS11_PIN", None)
