"""The production set-up docs/bitcoin-core.md recommends: a keystore sealed to a TPM (a
real swtpm), so bitcoind's child opens it with no passphrase at all. Core's calls, both
styles, end with a transaction Bitcoin Core's interpreter accepts."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from tests.bitcoin.kernel import assert_spends
from tests.cli.conftest import use_tpm_chain
from tests.signer.conftest import ABANDON_FP, PASSPHRASE, make_deployment
from tests.signer.core import Core
from tests.signer.test_core_calls import _check_descriptors, _wallet_psbt
from tests.support.cli import cli
from tests.support.swtpm import Swtpm

from anyhsm.bitcoin.psbt import Psbt
from anyhsm.ops.psbt import finalize_psbt

pytestmark = pytest.mark.tpm


def test_signer_with_a_tpm_sealed_keystore_needs_no_passphrase(tmp_path: Path, tpm: Swtpm) -> None:
    dep = make_deployment(tmp_path / "dep")
    config = use_tpm_chain(dep.config, tpm)
    with_pw = {"ANYHSM_PASSPHRASE": PASSPHRASE}
    enrolled = cli(*config, "tpm", "enroll", "--json", env=with_pw)
    assert enrolled.returncode == 0, enrolled.stderr
    try:
        for style in ("v27", "v28"):
            (dep.directory / "signer-public.json").unlink(missing_ok=True)
            core = Core(style, "regtest", {"ANYHSM_CONFIG": str(dep.config)})
            [signer] = core.enumerate()  # no index: the keystore opens through the TPM
            assert signer["fingerprint"] == ABANDON_FP and signer["name"].startswith("anyhsm ")
            _check_descriptors(core.getdescriptors(), "regtest", 1)
            psbt, spent = _wallet_psbt(["p2wpkh", "p2tr"])
            signed = Psbt.parse(base64.b64decode(core.signtx(psbt.to_base64())))
            tx = finalize_psbt(signed).tx
            assert tx is not None
            assert_spends(tx, spent)
    finally:
        done = cli(*config, "tpm", "unenroll", "--json", env=with_pw)
        assert done.returncode == 0, done.stderr
