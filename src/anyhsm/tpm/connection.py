"""One bounded, leak-free conversation with the TPM.

- tpm2-pytss is imported here, lazily, on first use: ``import anyhsm`` never
  needs it, and its absence is ProviderNotInstalled with the pip command.
- :func:`run` opens the TCTI and ESAPI in a worker thread and waits at most
  ``timeout_s`` for the whole operation. The TSS socket TCTIs block forever on
  a TPM that accepts but never answers (they ignore ESAPI's timeout), so the
  thread is the only reliable bound. A timed-out worker is abandoned; it ends
  when the TPM answers or the connection drops, still flushes what it loaded,
  and wipes any secret it was about to return. Operations on one TCTI are
  serialised (swtpm serves one connection at a time), so a stuck TPM costs
  later callers one timeout each, never a pile of threads.
- :class:`Connection` flushes every transient object and session it created
  (there is no resource manager in front of swtpm or /dev/tpm0: a leak ends
  in TPM_RC_OBJECT_MEMORY, 0x902, for every later client).
- :func:`translate` is the one place TSS errors become anyhsm errors.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from anyhsm.errors import (
    HsmError,
    ProviderNotInstalled,
    ProviderTimeout,
    ProviderUnavailable,
)
from anyhsm.tpm.errors import (
    TpmBlobInvalid,
    TpmCommandFailed,
    TpmLockout,
    TpmPolicyMismatch,
)
from anyhsm.tpm.settings import TpmSettings

T = TypeVar("T")

INSTALL_HINT = "pip install 'anyhsm[tpm]' (needs the TSS2 libraries: Debian libtss2-dev)"

# TSS2 return-code layers and the TPM codes anyhsm tells apart.
_LAYER_MASK = 0xFF0000
_LAYER_TPM = 0x000000
_LAYER_ESAPI = 0x070000
_LAYER_SYS = 0x080000
_LAYER_MU = 0x090000
_LAYER_TCTI = 0x0A0000
_LAYER_RESMGR = 0x0B0000
_LAYER_RESMGR_TPM = 0x0C0000
_BASE_NO_CONNECTION = 8
_BASE_TRY_AGAIN = 9
_BASE_IO_ERROR = 10
_BASE_NOT_PERMITTED = 12
_BASE_MALFORMED_RESPONSE = 17  # TSS2_BASE_RC_MALFORMED_RESPONSE

RC_INITIALIZE = 0x100
RC_FAILURE = 0x101
RC_PCR_CHANGED = 0x167
RC_AUTH_FAIL = 0x08E
RC_POLICY_FAIL = 0x09D
RC_INTEGRITY = 0x09F
RC_BAD_AUTH = 0x0A2
RC_LOCKOUT = 0x921
_RC_MEMORY = frozenset({0x902, 0x903, 0x904, 0x905, 0x906})  # object/session memory, handles
_RC_BUSY = frozenset({0x908, 0x909, 0x90A, 0x920, 0x922, 0x923})  # yielded..retry, NV

_pytss: Any = None
_import_lock = threading.Lock()


def pytss() -> Any:
    """The tpm2_pytss module, imported on first use."""
    global _pytss
    with _import_lock:
        if _pytss is None:
            # The TSS logs every failed connect to stderr; quiet unless the operator asks.
            os.environ.setdefault("TSS2_LOG", "all+none")
            try:
                import tpm2_pytss
            except ImportError as exc:
                raise ProviderNotInstalled(
                    f"the TPM provider needs tpm2-pytss, which cannot be imported ({exc})",
                    hint=INSTALL_HINT,
                ) from None
            _pytss = tpm2_pytss
        return _pytss


def ffi() -> Any:
    """The cffi FFI of tpm2-pytss, to move secrets in and out of C buffers without copies."""
    pytss()
    from tpm2_pytss._libtpm2_pytss import ffi as tss_ffi

    return tss_ffi


def pytss_available() -> bool:
    try:
        pytss()
    except ProviderNotInstalled:
        return False
    return True


# --- error translation -------------------------------------------------------------------


def _unreachable(tcti: str, detail: str) -> ProviderUnavailable:
    check = (
        "check that this user may open the device (usually group 'tss')"
        if tcti.startswith("device:")
        else "check that the TPM (or swtpm) is running and [providers.tpm] tcti points at it"
    )
    return ProviderUnavailable(
        f"TPM not reachable at {tcti!r} ({detail})",
        hint=check + "; the recovery passphrase still opens the keystore",
    )


def _response_code(rc: int) -> int:
    """A TPM response code without its handle/session/parameter number: format-one
    codes become 0x80 | error number (e.g. 0x98E -> 0x08E), format-zero ones keep
    their 0x100/0x900 base."""
    return (0x80 | (rc & 0x3F)) if rc & 0x80 else (rc & 0xFFF) & ~0x080


def tpm_response_code(exc: BaseException) -> int | None:
    """The TPM's own response code carried by a tpm2-pytss exception (see
    :func:`_response_code`), or None when the error came from elsewhere (the TSS,
    the transport, or no TSS at all). For callers that tell TPM codes apart
    before falling back to :func:`translate`."""
    if not isinstance(exc, pytss().TSS2_Exception):
        return None
    rc = int(exc.rc)
    if rc & _LAYER_MASK not in (_LAYER_TPM, _LAYER_RESMGR_TPM):
        return None
    return _response_code(rc)


def translate(exc: Exception, step: str, tcti: str) -> HsmError:
    """Turn an exception from tpm2-pytss into the matching anyhsm error."""
    if isinstance(exc, HsmError):
        return exc
    if not isinstance(exc, pytss().TSS2_Exception):
        return TpmCommandFailed(f"TPM library failure while {step}: {exc}")
    rc = int(exc.rc)
    layer = rc & _LAYER_MASK
    base = rc & 0xFFFF
    text = f"{exc} (rc 0x{rc:x})"
    if layer in (_LAYER_TCTI, _LAYER_RESMGR) or (
        layer in (_LAYER_ESAPI, _LAYER_SYS)
        and base in (_BASE_NO_CONNECTION, _BASE_IO_ERROR, _BASE_TRY_AGAIN, _BASE_NOT_PERMITTED)
    ):
        return _unreachable(tcti, text)
    if layer == _LAYER_MU:
        if step.startswith("parse"):
            return TpmBlobInvalid(f"the sealed blob's TPM objects do not parse: {text}")
        return TpmCommandFailed(f"TPM data could not be encoded while {step}: {text}", rc=rc)
    if layer in (_LAYER_ESAPI, _LAYER_SYS) and base == _BASE_MALFORMED_RESPONSE:
        return _unreachable(tcti, f"malformed response: {text}")
    if layer not in (_LAYER_TPM, _LAYER_RESMGR_TPM):
        return TpmCommandFailed(f"TPM software stack failed while {step}: {text}", rc=rc)

    code = _response_code(rc)
    if code in (RC_POLICY_FAIL, RC_PCR_CHANGED):
        return TpmPolicyMismatch(
            "the TPM refused to unseal: the PCRs the master key is sealed to have changed "
            "(firmware, Secure Boot or boot loader update?)"
        )
    if code == RC_LOCKOUT:
        return TpmLockout(
            "the TPM is in dictionary-attack lockout",
            hint="wait for the lockout to expire or reset it with the lockout authorisation "
            "(tpm2_dictionarylockout -c); the recovery passphrase still opens the keystore",
        )
    if code in _RC_MEMORY:
        return ProviderUnavailable(
            f"the TPM has no room for another object or session ({text})",
            hint="another client left objects loaded; use the kernel resource manager "
            "(/dev/tpmrm0) or restart the TPM simulator (anyhsm flushes all it loads)",
        )
    if code in _RC_BUSY:
        return ProviderUnavailable(f"the TPM is busy ({text})", hint="try again shortly")
    if code == RC_INITIALIZE:
        return ProviderUnavailable(
            f"the TPM has not been started: TPM2_Startup was never sent ({text})",
            hint="the firmware or kernel normally does this; for a simulator start it with "
            "startup flags (swtpm --flags startup-clear) or run tpm2_startup -c once",
        )
    if code == RC_FAILURE:
        return ProviderUnavailable(
            f"the TPM is in failure mode ({text})", hint="reboot the machine"
        )
    if step.startswith("load"):
        # The TPM checks the private blob's integrity under its parent: any failure here
        # means the blob was edited, or its parent (the primary key) is not the one it had.
        return TpmBlobInvalid(
            f"the TPM refused to load the sealed master key ({text}): the blob is damaged "
            "or was not sealed under this TPM's storage key",
            hint="open the keystore with the recovery passphrase and run 'anyhsm tpm enroll'",
        )
    if code in (RC_AUTH_FAIL, RC_BAD_AUTH) and step.startswith("create the storage primary"):
        return ProviderUnavailable(
            "the TPM owner hierarchy has an authorisation value; anyhsm seals under the "
            f"owner hierarchy with empty owner authorisation ({text})",
            hint="clear the owner password (tpm2_changeauth -c owner) or use another TPM",
        )
    if code == RC_INTEGRITY:
        return TpmBlobInvalid(f"the TPM reports an integrity failure while {step} ({text})")
    return TpmCommandFailed(f"TPM command failed while {step}: {text}", rc=rc)


# --- one conversation --------------------------------------------------------------------


class Connection:
    """An open ESAPI context plus the transient handles to flush when done."""

    def __init__(self, settings: TpmSettings) -> None:
        self.settings = settings
        self.lib = pytss()
        self._handles: list[Any] = []
        self.esys: Any = None
        device = settings.device_path
        if device is not None and not os.path.exists(device):
            raise ProviderUnavailable(
                f"no TPM device at {device}",
                hint="this machine has no TPM (or the driver is not loaded); set "
                "[providers.tpm] tcti, or open the keystore with the recovery passphrase",
            )
        with self.step("connect"):
            self.esys = self.lib.ESAPI(settings.tcti)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run TPM calls, translating their errors with ``what`` as context."""
        try:
            yield
        except HsmError:
            raise
        except Exception as exc:  # tpm2-pytss raises TSS2_Exception and a few built-ins
            raise translate(exc, what, self.settings.tcti) from None

    def track(self, handle: T) -> T:
        """Remember a transient object or session so that :meth:`close` flushes it."""
        self._handles.append(handle)
        return handle

    def flush(self, handle: object) -> None:
        """Flush one tracked handle now (frees one of the TPM's few object slots)."""
        if handle in self._handles:
            self._handles.remove(handle)
        with self.step("flush a transient object"):
            self.esys.flush_context(handle)

    def close(self) -> None:
        """Flush everything still tracked (best effort), then close ESAPI and the TCTI."""
        esys, self.esys = self.esys, None
        if esys is None:
            return
        handles, self._handles = self._handles, []
        for h in reversed(handles):
            with contextlib.suppress(Exception):  # the TPM may be gone; close anyway
                esys.flush_context(h)
        with contextlib.suppress(Exception):
            esys.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- bounded execution -------------------------------------------------------------------

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(tcti: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(tcti, threading.Lock())


@dataclass
class _Outcome(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    guard: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    abandoned: bool = False
    value: T | None = None
    error: BaseException | None = None


def run(
    settings: TpmSettings,
    what: str,
    operation: Callable[[Connection], T],
    *,
    discard: Callable[[T], None] | None = None,
) -> T:
    """Run ``operation`` on a fresh connection, bounded by ``settings.timeout_s``.

    ``discard`` disposes of a result nobody will collect (a timed-out unseal's
    secret is wiped by it). Raises ProviderTimeout when the bound is exceeded.
    """
    pytss()  # ProviderNotInstalled here, in the caller's thread, not in the worker
    timeout = settings.timeout_s
    deadline = time.monotonic() + timeout
    lock = _lock_for(settings.tcti)
    if not lock.acquire(timeout=timeout):
        raise ProviderTimeout(
            f"the TPM at {settings.tcti!r} did not answer within {timeout:g}s "
            "(an earlier command to it is still waiting)",
            hint="check the TPM; the recovery passphrase still opens the keystore",
        )
    out: _Outcome[T] = _Outcome()

    def worker() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            with Connection(settings) as conn:
                value = operation(conn)
        except BaseException as exc:  # handed to the waiting caller, re-raised there
            error = exc
        finally:
            lock.release()
            with out.guard:
                out.finished = True
                if out.abandoned:
                    if value is not None and discard is not None:
                        discard(value)
                else:
                    out.value, out.error = value, error
            out.done.set()

    thread = threading.Thread(target=worker, name=f"anyhsm-tpm-{what}", daemon=True)
    try:
        thread.start()
    except BaseException:
        lock.release()
        raise
    out.done.wait(max(0.0, deadline - time.monotonic()))
    with out.guard:
        if not out.finished:
            out.abandoned = True
    if out.abandoned:
        raise ProviderTimeout(
            f"the TPM at {settings.tcti!r} did not answer within {timeout:g}s while {what}",
            hint="check that the TPM is responsive; the recovery passphrase still opens "
            "the keystore",
        )
    if out.error is not None:
        raise out.error
    return out.value  # type: ignore[return-value]  # set whenever no error was recorded
