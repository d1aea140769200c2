"""Facts about the TPM (for health) and its random number generator."""

from __future__ import annotations

from anyhsm.errors import HsmError
from anyhsm.tpm import connection
from anyhsm.tpm.connection import Connection
from anyhsm.tpm.sealing import read_pcrs
from anyhsm.tpm.settings import TpmSettings

MAX_RANDOM = 4096
_RANDOM_CHUNK = 32  # every TPM 2.0 returns at least a SHA-256 digest's worth per call

# TPM_PT_* fixed and variable properties
_PT_FAMILY_INDICATOR = 0x100
_PT_REVISION = 0x102
_PT_YEAR = 0x104
_PT_MANUFACTURER = 0x105
_PT_VENDOR_STRING_1 = 0x106
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_FIRMWARE_VERSION_2 = 0x10C
_PT_PERMANENT = 0x200
_PT_LOCKOUT_COUNTER = 0x20E
_PT_MAX_AUTH_FAIL = 0x20F
_PERMANENT_OWNER_AUTH_SET = 0x1
_PERMANENT_IN_LOCKOUT = 0x200  # TPMA_PERMANENT.inLockout is bit 9


def _ascii(value: int) -> str:
    return value.to_bytes(4, "big").decode("ascii", errors="replace").replace("\x00", "").strip()


def _properties(conn: Connection, first: int, count: int) -> dict[int, int]:
    lib = conn.lib
    out: dict[int, int] = {}
    prop = first
    while prop < first + count:
        with conn.step("read TPM properties"):
            more, data = conn.esys.get_capability(lib.TPM2_CAP.TPM_PROPERTIES, prop, count)
        props = data.data.tpmProperties
        got = [(int(p.property), int(p.value)) for p in props.tpmProperty[: props.count]]
        out.update(got)
        if not more or not got:
            break
        prop = max(k for k, _ in got) + 1
    return out


def tpm_info(settings: TpmSettings) -> dict[str, str]:
    """Manufacturer, vendor string, firmware version, spec level and lockout state."""

    def op(conn: Connection) -> dict[str, str]:
        fixed = _properties(conn, _PT_FAMILY_INDICATOR, 0x30)
        variable = _properties(conn, _PT_PERMANENT, 0x20)
        vendor = "".join(_ascii(fixed.get(_PT_VENDOR_STRING_1 + i, 0)) for i in range(4))
        fw1 = fixed.get(_PT_FIRMWARE_VERSION_1, 0)
        fw2 = fixed.get(_PT_FIRMWARE_VERSION_2, 0)
        revision = fixed.get(_PT_REVISION, 0)
        permanent = variable.get(_PT_PERMANENT, 0)
        return {
            "tcti": settings.tcti,
            "manufacturer": _ascii(fixed.get(_PT_MANUFACTURER, 0)),
            "vendor": vendor,
            "firmware_version": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
            "family": _ascii(fixed.get(_PT_FAMILY_INDICATOR, 0)),
            "spec_revision": f"{revision // 100}.{revision % 100:02d}",
            "spec_year": str(fixed.get(_PT_YEAR, 0)),
            "owner_auth_set": "yes" if permanent & _PERMANENT_OWNER_AUTH_SET else "no",
            "in_lockout": "yes" if permanent & _PERMANENT_IN_LOCKOUT else "no",
            "lockout_counter": f"{variable.get(_PT_LOCKOUT_COUNTER, 0)}"
            f"/{variable.get(_PT_MAX_AUTH_FAIL, 0)}",
        }

    return connection.run(settings, "reading TPM properties", op)


def tpm_random(settings: TpmSettings, n: int) -> bytes:
    """``n`` bytes from the TPM's RNG (to XOR into os.urandom output for new keys).

    Mixing by XOR means a TPM RNG that is weak, or a bus attacker who replaces
    its output, cannot lower the entropy of a key below that of os.urandom.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_RANDOM:
        raise HsmError(f"ask the TPM for 1..{MAX_RANDOM} random bytes, not {n!r}")

    def op(conn: Connection) -> bytes:
        out = bytearray()
        while len(out) < n:
            with conn.step("read the TPM random number generator"):
                chunk = bytes(conn.esys.get_random(min(_RANDOM_CHUNK, n - len(out))))
            if not chunk:
                raise HsmError("the TPM random number generator returned no bytes")
            out += chunk
        return bytes(out[:n])

    return connection.run(settings, "reading the TPM random number generator", op)


def pcr_values(settings: TpmSettings, pcrs: tuple[int, ...] | None = None) -> dict[int, bytes]:
    """Current values of ``pcrs`` (default: the configured ones) in the configured bank."""
    wanted = settings.pcrs if pcrs is None else pcrs

    def op(conn: Connection) -> dict[int, bytes]:
        if not wanted:
            return {}
        return dict(zip(wanted, read_pcrs(conn, settings.pcr_bank, wanted), strict=True))

    return connection.run(settings, "reading PCRs", op)
