"""Typed settings of the TPM layer, from the ``[providers.tpm]`` config table.

Validated strictly: a typo such as ``pcr = [7]`` would otherwise silently seal
without the PCR policy the operator asked for, so unknown keys are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyhsm.errors import ConfigError

if TYPE_CHECKING:
    from anyhsm.config import Config, Problem

DEFAULT_TCTI = "device:/dev/tpmrm0"
PCR_COUNT = 24  # PC Client TPMs have PCRs 0..23

# bank name -> (TPM2_ALG id, digest size)
PCR_BANKS: dict[str, tuple[int, int]] = {
    "sha1": (0x0004, 20),
    "sha256": (0x000B, 32),
    "sha384": (0x000C, 48),
    "sha512": (0x000D, 64),
}

# TCTI modules anyhsm accepts: the kernel device (ideally the resource manager
# /dev/tpmrm0), the swtpm and mssim simulators, and the tpm2-abrmd daemon.
TCTI_NAMES = frozenset({"device", "swtpm", "mssim", "tabrmd"})

KNOWN_KEYS = frozenset({"tcti", "pcrs", "pcr_bank", "use_rng", "timeout_ms", "timeout_s"})
# Keys the factory may keep in every provider table; accepted and ignored here.
GENERIC_KEYS = frozenset({"enabled", "module", "priority", "label"})

MAX_TIMEOUT_S = 300.0


def _tcti_problems(tcti: str) -> list[str]:
    if not tcti or tcti != tcti.strip():
        return ["tcti must be a non-empty string without surrounding spaces"]
    name = tcti.split(":", 1)[0]
    if name not in TCTI_NAMES:
        return [
            f"tcti {tcti!r}: unknown TCTI {name!r} (use one of {', '.join(sorted(TCTI_NAMES))},"
            " e.g. 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321')"
        ]
    return []


def normalize_tcti(tcti: str) -> str:
    """A bare device path becomes ``device:<path>``; anything else is kept."""
    if tcti.startswith("/"):
        return f"device:{tcti}"
    return tcti


@dataclass(frozen=True)
class TpmSettings:
    """Where the TPM is and how the master key is bound to it.

    ``tcti``: TSS transport, e.g. ``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=2321``.
    ``pcrs``/``pcr_bank``: seal to these PCRs' current values (empty: no PCR policy).
    ``use_rng``: mix TPM random bytes into new keys. ``timeout_s``: bound on one TPM
    operation (connect plus the few commands it needs).
    """

    tcti: str
    pcrs: tuple[int, ...] = ()
    pcr_bank: str = "sha256"
    use_rng: bool = False
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        problems = _tcti_problems(self.tcti)
        if self.pcr_bank not in PCR_BANKS:
            problems.append(
                f"pcr_bank {self.pcr_bank!r} is not one of {', '.join(sorted(PCR_BANKS))}"
            )
        if list(self.pcrs) != sorted(set(self.pcrs)) or any(
            isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < PCR_COUNT
            for p in self.pcrs
        ):
            problems.append(
                f"pcrs {list(self.pcrs)!r} must be distinct PCR numbers 0..{PCR_COUNT - 1}, "
                "in ascending order"
            )
        if not isinstance(self.use_rng, bool):
            problems.append("use_rng must be true or false")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or not math.isfinite(self.timeout_s)
            or not 0 < self.timeout_s <= MAX_TIMEOUT_S
        ):
            problems.append(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
        if problems:
            raise ConfigError(
                "invalid [providers.tpm] settings: " + "; ".join(problems),
                hint="see docs/tpm.md for the settings of the TPM provider",
                problems=problems,
            )

    @property
    def device_path(self) -> str | None:
        """The device file for a ``device`` TCTI (its default is /dev/tpm0), else None."""
        name, _, conf = self.tcti.partition(":")
        if name != "device":
            return None
        return conf or "/dev/tpm0"

    @classmethod
    def from_mapping(
        cls, settings: Mapping[str, object], *, default_timeout_s: float = 2.0
    ) -> TpmSettings:
        """Parse a config table; every problem is reported at once as a ConfigError."""
        problems: list[str] = []
        unknown = sorted(set(settings) - KNOWN_KEYS - GENERIC_KEYS)
        if unknown:
            problems.append(
                f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"
            )

        raw_tcti = settings.get("tcti", DEFAULT_TCTI)
        tcti = DEFAULT_TCTI
        if isinstance(raw_tcti, str):
            tcti = normalize_tcti(raw_tcti)
            problems.extend(_tcti_problems(tcti))
        else:
            problems.append("tcti must be a string")

        raw_pcrs = settings.get("pcrs", [])
        pcrs: tuple[int, ...] = ()
        if isinstance(raw_pcrs, list | tuple):
            ints = [p for p in raw_pcrs if isinstance(p, int) and not isinstance(p, bool)]
            if len(ints) != len(raw_pcrs):
                problems.append("pcrs must be a list of PCR numbers, e.g. [7]")
            elif len(set(ints)) != len(ints) or any(not 0 <= p < PCR_COUNT for p in ints):
                problems.append(f"pcrs {ints!r} must be distinct PCR numbers 0..{PCR_COUNT - 1}")
            else:
                pcrs = tuple(sorted(ints))
        else:
            problems.append("pcrs must be a list of PCR numbers, e.g. [7]")

        bank = settings.get("pcr_bank", "sha256")
        if not isinstance(bank, str) or bank.lower() not in PCR_BANKS:
            problems.append(f"pcr_bank {bank!r} is not one of {', '.join(sorted(PCR_BANKS))}")
            bank = "sha256"
        else:
            bank = bank.lower()

        use_rng = settings.get("use_rng", False)
        if not isinstance(use_rng, bool):
            problems.append("use_rng must be true or false")
            use_rng = False

        timeout: object = settings.get("timeout_s", default_timeout_s)
        if "timeout_ms" in settings:
            ms = settings["timeout_ms"]
            if "timeout_s" in settings:
                problems.append("set timeout_ms or timeout_s, not both")
            elif isinstance(ms, bool) or not isinstance(ms, int | float):
                problems.append("timeout_ms must be a number of milliseconds")
            else:
                timeout = ms / 1000
        timeout_s = 2.0
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_TIMEOUT_S
        ):
            problems.append(
                f"the timeout must be above 0 and at most {MAX_TIMEOUT_S:g} s "
                f"({MAX_TIMEOUT_S * 1000:g} ms)"
            )
        else:
            timeout_s = float(timeout)

        if problems:
            raise ConfigError(
                "invalid [providers.tpm] settings: " + "; ".join(problems),
                hint="see docs/tpm.md for the settings of the TPM provider",
                problems=problems,
            )
        return cls(tcti=tcti, pcrs=pcrs, pcr_bank=bank, use_rng=use_rng, timeout_s=timeout_s)

    def describe(self) -> dict[str, object]:
        """Settings for status output (nothing here is secret)."""
        return {
            "tcti": self.tcti,
            "pcrs": list(self.pcrs),
            "pcr_bank": self.pcr_bank,
            "use_rng": self.use_rng,
            "timeout_s": self.timeout_s,
        }


def config_problems(cfg: Config) -> list[Problem]:
    """The config check named by the tpm registry spec: a chain with ``tpm`` needs to
    say where the TPM is."""
    from anyhsm.config import Problem

    if "tpm" in cfg.fallback.chain and "tcti" not in cfg.provider_settings("tpm"):
        return [
            Problem(
                "providers.tpm.tcti",
                "<unset>",
                "tpm is in the chain but no TCTI is configured",
                'set tcti = "device:/dev/tpmrm0" or a swtpm TCTI',
            )
        ]
    return []
