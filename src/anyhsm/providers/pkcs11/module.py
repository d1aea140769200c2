"""Process-wide state of loaded PKCS#11 modules: one entry per module path.

PKCS#11 state is per process, not per object: C_Initialize happens once per module,
and a login belongs to the application, shared by all its sessions on that token.
So several providers (or the wrap helper) on the same module share one
:class:`LoadedModule`, which

- initialises the module (with ``CKF_OS_LOCKING_OK`` when ``threadsafe_module``) on
  first use and finalises it after the last user released it, so a later ``open``
  starts clean (also after an ``open`` that timed out in the factory's worker thread);
- gates every module call: serialised through one lock when the module was
  initialised without OS locking (python-pkcs11 releases the GIL, and SoftHSM2 then
  corrupts its heap with two threads), or shared/exclusive when it is thread-safe,
  where only a re-initialisation needs everyone out;
- keeps one login per token with a reference count, so the last user logs out and a
  second login with a different PIN is rejected rather than silently riding on the first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anyhsm.errors import PinLocked, PinRejected, ProviderError, ProviderTimeout
from anyhsm.providers.pkcs11.cryptoki import Cryptoki, handle_of, logged_in_state
from anyhsm.providers.pkcs11.errors import (
    CKR_CANT_LOCK,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_OK,
    CKR_PIN_INCORRECT,
    CKR_USER_ALREADY_LOGGED_IN,
    translate,
    translate_rv,
)

if TYPE_CHECKING:
    from pkcs11 import Session, Token

    from anyhsm.providers.pkcs11.lib import HookedLib
    from anyhsm.secret import SecretBytes

CKF_USER_PIN_COUNT_LOW = 0x00010000
CKF_USER_PIN_FINAL_TRY = 0x00020000
CKF_USER_PIN_LOCKED = 0x00040000


def _timeout(what: str, timeout: float) -> ProviderTimeout:
    return ProviderTimeout(
        f"PKCS#11 {what} did not get its turn within {timeout:g} s",
        hint="the token is busy or a module call hangs; raise timeout_s or check the token",
    )


class Gate:
    """Admission to module calls: ``shared`` for ordinary calls, ``exclusive`` for
    (re)initialisation. Serialised modules use one lock for both."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_shared(self, timeout: float) -> None:
        """Enter for an ordinary module call (pair with :meth:`release_shared`)."""
        if not self.parallel:
            if not self._lock.acquire(timeout=timeout):
                raise _timeout("call", timeout)
            return
        with self._cond:
            if not self._cond.wait_for(
                lambda: not self._writer and not self._writers_waiting, timeout
            ):
                raise _timeout("call", timeout)
            self._readers += 1

    def release_shared(self) -> None:
        if not self.parallel:
            self._lock.release()
            return
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self, timeout: float) -> Iterator[None]:
        self.acquire_shared(timeout)
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        if not self.parallel:
            with self.shared(timeout):
                yield
            return
        with self._cond:
            self._writers_waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._writer and not self._readers, timeout)
            finally:
                self._writers_waiting -= 1
            if not ok:
                self._cond.notify_all()
                raise _timeout("re-initialisation", timeout)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Login:
    """One application login to one token, shared by the users of that token."""

    serial: bytes
    anchor: Session  # the session C_Login went through; kept open while logged in
    pin: SecretBytes  # a copy, to compare later logins against (constant time)
    generation: int
    external: bool  # somebody else in the process had already logged in
    users: int = 1
    valid: bool = True


@dataclass
class LoadedModule:
    """One PKCS#11 module loaded in this process."""

    path: str
    cryptoki: Cryptoki
    lib: HookedLib | None = None
    os_locking: bool = False
    owns_init: bool = False
    note: str = ""
    generation: int = 0
    users: int = 0
    gate: Gate = field(default_factory=lambda: Gate(parallel=False))
    _want_locking: bool = False
    _logins: dict[bytes, Login] = field(default_factory=dict)
    _login_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- initialisation ------------------------------------------------------------

    def _c_initialize(self) -> None:
        want = self._want_locking
        rv = self.cryptoki.initialize(os_locking=want)
        self.note = ""
        if want and rv == CKR_CANT_LOCK:
            rv = self.cryptoki.initialize(os_locking=False)
            want = False
            self.note = "the module cannot use OS locking; calls are serialised"
        if rv == CKR_OK:
            self.owns_init = True
            self.os_locking = want
        elif rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            # Other code in this process initialised it; its locking mode is unknown.
            self.owns_init = False
            self.os_locking = False
            self.note = "initialised by other code in this process; calls are serialised"
        else:
            raise translate_rv(rv, "module initialisation")
        self.generation += 1

    def start(self, os_locking: bool) -> None:
        """C_Initialize (loading the library through python-pkcs11 the first time)."""
        self._want_locking = os_locking
        if self.lib is None:
            import pkcs11

            from anyhsm.providers.pkcs11 import lib as pkcs11_lib

            try:
                self.lib = pkcs11_lib.load(self.path, self._c_initialize)
            except pkcs11.PKCS11Error as exc:
                raise translate(exc, "module loading") from None
        else:
            self._c_initialize()
        self.gate = Gate(parallel=self.os_locking)

    def stop(self) -> None:
        """C_Finalize if anyhsm initialised the module; every session and login ends."""
        if self.owns_init:
            self.cryptoki.finalize()
            self.owns_init = False
        self.generation += 1
        self._logins.clear()

    def reinitialize(self, timeout: float) -> bool:
        """C_Finalize + C_Initialize, to see tokens that left and came back.

        Every session and login of the module ends; users notice through
        ``generation``. Returns False when the module is not anyhsm's to reset.
        """
        if not self.owns_init:
            return False
        with self.gate.exclusive(timeout):
            self.cryptoki.finalize()
            self.owns_init = False
            self._c_initialize()
        return True

    # --- login -------------------------------------------------------------------------

    def _still_logged_in(self, login: Login) -> bool:
        rv, state = self.cryptoki.session_state(handle_of(login.anchor))
        return rv == CKR_OK and logged_in_state(state)

    def login(self, token: Token, pin: SecretBytes, timeout: float) -> Login:
        """Log in to ``token`` (or join the existing login after checking the PIN)."""
        import pkcs11

        if not self._login_lock.acquire(timeout=timeout):
            raise _timeout("login", timeout)
        try:
            serial = bytes(token.serial)
            with self.gate.shared(timeout):
                current = self._logins.get(serial)
                if current is not None:
                    if (
                        current.valid
                        and current.generation == self.generation
                        and self._still_logged_in(current)
                    ):
                        if not current.external and not current.pin.equals(pin):
                            raise PinRejected(
                                "the PIN was rejected: it differs from the PIN this process "
                                f"already logged in to token {serial.decode(errors='replace')} "
                                "with (CKR_PIN_INCORRECT)",
                                hint="use the same PIN for every anyhsm user of a token",
                            )
                        current.users += 1
                        return current
                    current.valid = False
                    del self._logins[serial]
                if int(token.flags) & CKF_USER_PIN_LOCKED:
                    raise PinLocked(
                        "the user PIN of the token is locked (CKF_USER_PIN_LOCKED); "
                        "anyhsm did not try to log in",
                        hint="unblock it with the SO PIN using the vendor's tool",
                    )
                try:
                    anchor = token.open(rw=False)
                except pkcs11.PKCS11Error as exc:
                    raise translate(exc, "session opening") from None
                rv = self.cryptoki.login(handle_of(anchor), pin.buffer)
                if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
                    with contextlib.suppress(pkcs11.PKCS11Error):
                        anchor.close()
                    raise translate_rv(rv, "login", hint=self._pin_flags_hint(token, rv))
            login = Login(
                serial=serial,
                anchor=anchor,
                pin=pin_copy(pin),
                generation=self.generation,
                external=rv == CKR_USER_ALREADY_LOGGED_IN,
            )
            self._logins[serial] = login
            return login
        finally:
            self._login_lock.release()

    def _pin_flags_hint(self, token: Token, rv: int) -> str | None:
        if rv != CKR_PIN_INCORRECT:
            return None
        import pkcs11

        try:
            flags = int(token.slot.get_token().flags)
        except pkcs11.PKCS11Error:
            return None
        if flags & CKF_USER_PIN_FINAL_TRY:
            return "the token says ONE attempt is left before the PIN locks"
        if flags & CKF_USER_PIN_COUNT_LOW:
            return "the token says few attempts are left before the PIN locks"
        return None

    def drop_login(self, login: Login, *, close_anchor: bool, timeout: float) -> None:
        """Forget a login that broke; with ``close_anchor`` (its handles are still ours)
        also log out and close it, so the next login starts clean."""
        import pkcs11

        with self._login_lock:
            if self._logins.get(login.serial) is login:
                del self._logins[login.serial]
            was_valid = login.valid
            login.valid = False
        if was_valid and close_anchor and login.generation == self.generation:
            with (
                contextlib.suppress(pkcs11.PKCS11Error, ProviderError),
                self.gate.shared(timeout),
            ):
                if not login.external:
                    self.cryptoki.logout(handle_of(login.anchor))
                login.anchor.close()

    def logout(self, login: Login, timeout: float) -> None:
        """Release one user of ``login``; the last one logs out and closes the anchor."""
        import pkcs11

        with self._login_lock:
            login.users -= 1
            if login.users > 0:
                return
            if self._logins.get(login.serial) is login:
                del self._logins[login.serial]
            live = login.valid and login.generation == self.generation
            login.valid = False
        try:
            if live:
                with (
                    contextlib.suppress(pkcs11.PKCS11Error, ProviderError),
                    self.gate.shared(timeout),
                ):
                    if not login.external:
                        self.cryptoki.logout(handle_of(login.anchor))
                    login.anchor.close()
        finally:
            login.pin.wipe()

    def logged_in(self, login: Login, timeout: float) -> bool:
        with self.gate.shared(timeout):
            return (
                login.valid
                and login.generation == self.generation
                and (self._still_logged_in(login))
            )


def pin_copy(pin: SecretBytes) -> SecretBytes:
    from anyhsm.secret import SecretBytes

    return SecretBytes(pin.buffer)


# --- the registry ---------------------------------------------------------------------

_registry_lock = threading.Lock()
_modules: dict[str, LoadedModule] = {}
_module_locks: dict[str, threading.Lock] = {}


def _module_lock(key: str, timeout: float) -> threading.Lock:
    if not _registry_lock.acquire(timeout=timeout):
        raise _timeout("module registry", timeout)
    try:
        return _module_locks.setdefault(key, threading.Lock())
    finally:
        _registry_lock.release()


def acquire_module(path: str, *, os_locking: bool, timeout: float) -> tuple[LoadedModule, bool]:
    """The loaded module for ``path`` (loading and initialising it if needed).

    Returns ``(module, fresh)``; ``fresh`` is True when this call initialised it.
    """
    key = os.path.realpath(path)
    lock = _module_lock(key, timeout)
    if not lock.acquire(timeout=timeout):
        raise _timeout("module loading", timeout)
    try:
        module = _modules.get(key)
        if module is None:
            module = LoadedModule(path=key, cryptoki=Cryptoki(key))
            _modules[key] = module
        fresh = module.users == 0
        if fresh:
            module.start(os_locking)
        module.users += 1
        return module, fresh
    finally:
        lock.release()


def release_module(module: LoadedModule, timeout: float) -> None:
    """One user fewer; the last one finalises the module (if anyhsm initialised it)."""
    lock = _module_lock(module.path, timeout)
    if not lock.acquire(timeout=timeout):
        raise _timeout("module release", timeout)
    try:
        module.users -= 1
        if module.users == 0:
            module.stop()
    finally:
        lock.release()


def loaded_module(path: str) -> LoadedModule | None:
    """The registry entry for ``path`` if it is in use (for tests and benchmarks)."""
    module = _modules.get(os.path.realpath(path))
    return module if module is not None and module.users > 0 else None
