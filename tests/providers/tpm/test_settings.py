"""TpmSettings: parsing the [providers.tpm] table (no TPM needed)."""

from __future__ import annotations

import pytest

from anyhsm.errors import ConfigError
from anyhsm.tpm import TpmSettings


def test_defaults_and_normalisation() -> None:
    s = TpmSettings.from_mapping({})
    assert s == TpmSettings(tcti="device:/dev/tpmrm0")
    assert s.device_path == "/dev/tpmrm0"
    s = TpmSettings.from_mapping({"tcti": "/dev/tpm0"})
    assert s.tcti == "device:/dev/tpm0"
    s = TpmSettings.from_mapping(
        {
            "tcti": "swtpm:host=127.0.0.1,port=2321",
            "pcrs": [7, 0],
            "pcr_bank": "SHA256",
            "use_rng": True,
            "timeout_ms": 1500,
        }
    )
    assert s.pcrs == (0, 7)
    assert s.pcr_bank == "sha256"
    assert s.use_rng is True
    assert s.timeout_s == 1.5
    assert s.device_path is None
    assert TpmSettings.from_mapping({}, default_timeout_s=0.25).timeout_s == 0.25
    assert TpmSettings.from_mapping({"timeout_s": 3}).timeout_s == 3.0


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        TpmSettings.from_mapping(
            {
                "tcti": "carrier-pigeon:coop=1",
                "pcrs": [7, 7, 99],
                "pcr_bank": "md5",
                "use_rng": "yes",
                "timeout_ms": -5,
                "pcr": [7],
            }
        )
    problems = info.value.problems
    assert len(problems) == 6
    joined = " ".join(problems)
    for word in ("pcr", "carrier-pigeon", "md5", "use_rng", "timeout", "distinct"):
        assert word in joined


@pytest.mark.parametrize(
    "table",
    [
        {"pcr": [7]},  # a typo must not silently drop the PCR policy
        {"pcrs": 7},
        {"pcrs": [True]},
        {"pcrs": [-1]},
        {"pcrs": [24]},
        {"tcti": ""},
        {"tcti": 5},
        {"tcti": " swtpm:port=1"},
        {"timeout_s": 0},
        {"timeout_s": float("nan")},
        {"timeout_s": 1, "timeout_ms": 1000},
        {"timeout_ms": True},
        {"use_rng": 1},
    ],
)
def test_bad_values_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TpmSettings.from_mapping(table)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError):
        TpmSettings(tcti="swtpm:port=1", pcrs=(7, 3))
    with pytest.raises(ConfigError):
        TpmSettings(tcti="swtpm:port=1", pcr_bank="sha3")
    with pytest.raises(ConfigError):
        TpmSettings(tcti="nope")


def test_generic_factory_keys_are_accepted() -> None:
    assert TpmSettings.from_mapping({"enabled": True, "tcti": "mssim:port=2321"}).tcti == (
        "mssim:port=2321"
    )
