"""One logged-in connection to one PKCS#11 token: module, login, session pool, reconnect.

Every operation runs through :meth:`Connection.run`, which borrows a pooled session,
takes the module gate (serialised unless the module runs with OS locking), calls the
operation, and turns any python-pkcs11 exception into a typed anyhsm error. When the
failure means the sessions or the login are gone (token removed, sessions closed
underneath, module finalised) it drops them, reconnects (re-initialising the module
if the token has to be found again) and retries once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from anyhsm.errors import (
    ConfigError,
    HsmError,
    ProviderError,
    ProviderNotInstalled,
    ProviderUnavailable,
)
from anyhsm.providers.pkcs11.cryptoki import handle_of, logged_in_state
from anyhsm.providers.pkcs11.errors import (
    connection_lost,
    handles_gone,
    stale_object,
    translate,
)
from anyhsm.providers.pkcs11.module import (
    CKF_USER_PIN_COUNT_LOW,
    CKF_USER_PIN_FINAL_TRY,
    CKF_USER_PIN_LOCKED,
    LoadedModule,
    Login,
    acquire_module,
    release_module,
)
from anyhsm.providers.pkcs11.pool import PooledSession, SessionPool
from anyhsm.providers.pkcs11.settings import Pkcs11Settings, load_pin
from anyhsm.types import Environment

if TYPE_CHECKING:
    from types import ModuleType

    from pkcs11 import Token

    from anyhsm.secret import SecretBytes

T = TypeVar("T")

CKF_TOKEN_INITIALIZED = 0x00000400
RECONNECT_BACKOFF_S = 0.25
INSTALL_HINT = "pip install 'anyhsm[pkcs11]'"


def import_pkcs11(provider: str) -> ModuleType:
    """python-pkcs11, or ProviderNotInstalled with the command that installs it."""
    try:
        import pkcs11
    except ImportError:
        raise ProviderNotInstalled(
            f"the {provider} provider needs python-pkcs11, which is not installed",
            hint=INSTALL_HINT,
        ) from None
    return pkcs11


@dataclass(frozen=True)
class TokenFacts:
    """What the token says about itself (public, for health and store ids)."""

    label: str
    serial: str
    manufacturer: str
    model: str
    firmware: str
    hardware: str
    flags: int
    slot_id: int


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def token_facts(token: Token) -> TokenFacts:
    return TokenFacts(
        label=token.label,
        serial=bytes(token.serial).decode("ascii", "replace").strip(),
        manufacturer=token.manufacturer_id,
        model=token.model,
        firmware=_version(token.firmware_version),
        hardware=_version(token.hardware_version),
        flags=int(token.flags),
        slot_id=int(token.slot.slot_id),
    )


class _StaleGeneration(Exception):
    """A pooled session belongs to an earlier initialisation of the module."""


class Connection:
    """A token reached through a module, logged in, with a pool of sessions."""

    def __init__(
        self,
        settings: Pkcs11Settings,
        environment: Environment,
        timeout_s: float,
        provider_name: str = "pkcs11",
    ) -> None:
        self.settings = settings
        self.name = provider_name
        self._environment = environment
        self._timeout = max(float(timeout_s), 0.05)
        self._state_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._p11: ModuleType | None = None
        self._module: LoadedModule | None = None
        self._pin: SecretBytes | None = None
        self._token: Token | None = None
        self._facts: TokenFacts | None = None
        self._login: Login | None = None
        self._pool: SessionPool | None = None
        self._generation = -1
        self._epoch = 0
        self._reconnects = 0
        self._last_error: HsmError | None = None
        self._retry_after = 0.0
        self._closed = True

    # --- lifecycle -----------------------------------------------------------------

    def on_reset(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever cached object handles must be forgotten."""
        self._listeners.append(listener)

    def _notify_reset(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def is_open(self) -> bool:
        return not self._closed

    def open(self) -> None:
        """Load the module, find the token, log in. Safe to call again after a failure."""
        if not self._closed:
            return
        path = self.settings.module
        self.settings.require_module()  # before anything slow: fallback must be fast
        self._p11 = import_pkcs11(self.name)
        pin = load_pin(self.settings, self._environment)
        try:
            module, fresh = acquire_module(
                str(path), os_locking=self.settings.threadsafe_module, timeout=self._timeout
            )
        except BaseException:
            pin.wipe()
            raise
        try:
            with self._state_lock:
                self._module = module
                self._pin = pin
                self._connect(allow_reinit=not fresh)
                self._closed = False
        except BaseException:
            self._module = None
            self._pin = None
            pin.wipe()
            with contextlib.suppress(HsmError):
                release_module(module, self._timeout)
            raise

    def close(self) -> None:
        """Close the sessions, log out if this was the last user, release the module."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            module, pool, login, pin = self._module, self._pool, self._login, self._pin
            self._pool = None
            self._login = None
            self._module = None
            self._pin = None
        self._notify_reset()
        if module is None:
            return
        try:
            if pool is not None:
                pool.close(close_sessions=self._generation == module.generation)
            if login is not None:
                module.logout(login, self._timeout)
        finally:
            if pin is not None:
                pin.wipe()
            release_module(module, self._timeout)

    # --- connecting ----------------------------------------------------------------------

    def _lookup_token(self, module: LoadedModule) -> Token:
        p11 = self._require_p11()
        s = self.settings
        assert module.lib is not None
        tokens: list[Token] = []
        try:
            with module.gate.shared(self._timeout):
                for slot in module.lib.get_slots(token_present=True):
                    try:
                        token = slot.get_token()
                    except (p11.TokenNotPresent, p11.TokenNotRecognised):
                        continue
                    if int(token.flags) & CKF_TOKEN_INITIALIZED:
                        tokens.append(token)
        except p11.PKCS11Error as exc:
            raise translate(exc, "token lookup", provider=self.name) from None
        found = [
            t
            for t in tokens
            if (s.token_label is None or t.label == s.token_label)
            and (s.token_serial is None or token_facts(t).serial == s.token_serial)
        ]
        if not found:
            present = (
                ", ".join(f"{t.label!r} (serial {token_facts(t).serial})" for t in tokens) or "none"
            )
            raise ProviderUnavailable(
                f"no PKCS#11 token with {s.describe_token()} in {s.module} "
                f"(NO_SUCH_TOKEN; initialised tokens present: {present})",
                hint="insert/initialise the token or fix token_label / token_serial",
            )
        if len(found) > 1:
            raise ConfigError(
                f"{len(found)} PKCS#11 tokens match {s.describe_token()}",
                hint="select the token by token_serial",
            )
        return found[0]

    def _find_token(self, module: LoadedModule, allow_reinit: bool) -> Token:
        try:
            return self._lookup_token(module)
        except ProviderUnavailable:
            # A token that left and came back, or one initialised after the module
            # was loaded, is only seen after C_Finalize + C_Initialize.
            if not allow_reinit or not module.reinitialize(self._timeout):
                raise
            return self._lookup_token(module)

    def _connect(self, allow_reinit: bool) -> None:
        """Find the token, log in and make a fresh pool (state lock held)."""
        module, pin = self._module, self._pin
        assert module is not None and pin is not None
        token = self._find_token(module, allow_reinit)
        facts = token_facts(token)
        if self._facts is not None and facts.serial != self._facts.serial:
            raise ProviderUnavailable(
                f"the token with {self.settings.describe_token()} is now serial "
                f"{facts.serial}, not {self._facts.serial}: it is a different token",
                hint="the keys of the original token are not on it; restore that token "
                "or reopen the provider",
            )
        login = module.login(token, pin, self._timeout)
        self._token = token
        self._facts = facts
        self._login = login
        self._generation = login.generation
        self._pool = SessionPool(
            self.settings.pool_size, self._open_session, self._close_session, self._timeout
        )
        self._epoch += 1

    def _open_session(self) -> PooledSession:
        module, token = self._module, self._token
        if module is None or token is None:
            raise ProviderUnavailable("the pkcs11 provider is closed", hint="open it first")
        with module.gate.shared(self._timeout):
            return PooledSession(session=token.open(rw=True), generation=module.generation)

    def _close_session(self, ps: PooledSession) -> None:
        module = self._module
        p11 = self._p11
        if module is None or p11 is None or ps.generation != module.generation:
            return
        with contextlib.suppress(p11.PKCS11Error), module.gate.shared(self._timeout):
            ps.session.close()

    def _require_p11(self) -> ModuleType:
        if self._p11 is None:
            self._p11 = import_pkcs11(self.name)
        return self._p11

    def _drop(self, *, close_handles: bool) -> None:
        """Forget pool and login (state lock held)."""
        module, pool, login = self._module, self._pool, self._login
        self._pool = None
        self._login = None
        if module is None:
            return
        close = close_handles and self._generation == module.generation
        if pool is not None:
            pool.close(close_sessions=close)
        if login is not None:
            module.drop_login(login, close_anchor=close, timeout=self._timeout)
            module.logout(login, self._timeout)

    def _live(self, force: bool = False) -> tuple[SessionPool, int, LoadedModule]:
        """The current pool, reconnecting first if the connection broke."""
        pool, module = self._pool, self._module
        if (
            pool is not None
            and module is not None
            and self._generation == module.generation
            and not force
        ):
            return pool, self._epoch, module
        with self._state_lock:
            module = self._module
            if self._closed or module is None:
                raise ProviderUnavailable(
                    f"the {self.name} provider is not open", hint="open it first"
                )
            if self._pool is not None and self._generation != module.generation:
                # The module was re-initialised (by us for another token, or a retry):
                # every session and the login of the old generation are gone.
                self._drop(close_handles=False)
                self._notify_reset()
            if self._pool is None:
                now = time.monotonic()
                if not force and now < self._retry_after and self._last_error is not None:
                    # Fail fast during the back-off; fresh traceback (no growth per raise).
                    raise self._last_error.with_traceback(None)
                try:
                    self._connect(allow_reinit=True)
                except HsmError as exc:
                    self._last_error = exc
                    self._retry_after = time.monotonic() + RECONNECT_BACKOFF_S
                    raise
                self._reconnects += 1
                self._last_error = None
            assert self._pool is not None
            return self._pool, self._epoch, module

    def _break(self, epoch: int, error: HsmError, *, close_handles: bool) -> None:
        """The connection of ``epoch`` failed: drop it so the next call reconnects."""
        with self._state_lock:
            if self._epoch != epoch or self._pool is None:
                return
            self._last_error = error
            self._drop(close_handles=close_handles)
        self._notify_reset()

    def verify_presence(self, ps: PooledSession) -> None:
        """Inside an operation (gate held): raise the module's own error if the token
        is gone or the login was lost, so "not found" is not blamed on the key."""
        p11 = self._require_p11()
        ps.session.token.slot.get_token()  # raises when the token went away
        module, login = self._module, self._login
        if module is None or login is None:
            raise p11.UserNotLoggedIn()
        rv, state = module.cryptoki.session_state(handle_of(login.anchor))
        if rv != 0 or not logged_in_state(state):
            raise p11.UserNotLoggedIn()

    def still_logged_in(self) -> bool:
        module, login = self._module, self._login
        if module is None or login is None:
            return False
        return module.logged_in(login, self._timeout)

    # --- running operations ---------------------------------------------------------------

    def run(self, op: Callable[[PooledSession], T], action: str, *, retry: bool = True) -> T:
        """Run ``op`` on a pooled session; typed errors only; one retry after reconnecting."""
        p11 = self._require_p11()
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            pool, epoch, module = self._live()
            ps: PooledSession | None = None
            try:
                ps = pool.checkout()
                gate = module.gate
                gate.acquire_shared(self._timeout)
                try:
                    if ps.generation != module.generation:
                        raise _StaleGeneration
                    result = op(ps)
                finally:
                    gate.release_shared()
            except _StaleGeneration:
                assert ps is not None
                pool.discard(ps, close=False)
                self._break(
                    epoch,
                    ProviderUnavailable("the module was re-initialised"),
                    close_handles=False,
                )
                if last:
                    raise ProviderUnavailable(
                        f"PKCS#11 {action} was interrupted: the module was re-initialised",
                        hint="retry",
                    ) from None
                continue
            except p11.PKCS11Error as exc:
                error = translate(exc, action, provider=self.name)
                if connection_lost(exc):
                    gone = handles_gone(exc)
                    if ps is not None:
                        pool.discard(ps, close=not gone)
                    self._break(epoch, error, close_handles=not gone)
                    if last:
                        raise error from None
                    continue
                if ps is not None:
                    if stale_object(exc):
                        ps.objects.clear()
                    pool.checkin(ps)
                if stale_object(exc) and not last:
                    # A cached handle died: the key was deleted, the login was lost or
                    # the token went away. Retry afresh; a lookup that then finds
                    # nothing calls verify_presence, which tells these apart.
                    self._notify_reset()
                    continue
                raise error from None
            except BaseException:
                if ps is not None:
                    pool.checkin(ps)
                raise
            pool.checkin(ps)
            return result
        raise ProviderError(f"PKCS#11 {action} failed")  # pragma: no cover - loop returns

    # --- facts and health ---------------------------------------------------------------

    @property
    def facts(self) -> TokenFacts | None:
        return self._facts

    @property
    def module(self) -> LoadedModule | None:
        return self._module

    def probe(self) -> TokenFacts:
        """Open a fresh session, check the login holds, re-read the token's info.

        Forces a reconnect attempt first if the connection is broken."""
        p11 = self._require_p11()
        self._live(force=self._pool is None)

        def op(ps: PooledSession) -> TokenFacts:
            token = ps.session.token
            module = self._module
            assert module is not None
            fresh = token.open(rw=False)
            try:
                rv, state = module.cryptoki.session_state(handle_of(fresh))
            finally:
                fresh.close()
            if rv != 0 or not logged_in_state(state):
                raise p11.UserNotLoggedIn()
            return token_facts(token.slot.get_token())

        facts = self.run(op, "health check")
        self._facts = facts
        return facts

    def details(self) -> dict[str, object]:
        """Public facts for health reports (no secrets; counts as numbers)."""
        out: dict[str, object] = {"module": str(self.settings.module)}
        module = self._module
        if module is not None:
            lib = module.lib
            if lib is not None:
                out["library"] = f"{lib.manufacturer_id} {lib.library_description}".strip()
            out["locking"] = (
                "os-locking (parallel sessions)" if module.os_locking else ("serialised per module")
            )
            if module.note:
                out["locking_note"] = module.note
        facts = self._facts
        if facts is not None:
            out.update(
                token_label=facts.label,
                token_serial=facts.serial,
                manufacturer=facts.manufacturer,
                model=facts.model,
                firmware=facts.firmware,
                hardware=facts.hardware,
            )
            pin_state = "ok"
            if facts.flags & CKF_USER_PIN_LOCKED:
                pin_state = "locked"
            elif facts.flags & CKF_USER_PIN_FINAL_TRY:
                pin_state = "final try left"
            elif facts.flags & CKF_USER_PIN_COUNT_LOW:
                pin_state = "wrong attempts recorded"
            out["user_pin"] = pin_state
        pool = self._pool
        if pool is not None:
            st = pool.stats()
            out.update(
                pool_size=st.size,
                pool_open=st.open,
                pool_idle=st.idle,
                pool_in_use=st.in_use,
                pool_waits=st.waits,
            )
        else:
            out["pool_size"] = self.settings.pool_size
            out["pool_open"] = 0
        out["reconnects"] = self._reconnects
        login = self._login
        if login is not None and login.external:
            out["login"] = "already logged in by other code in this process"
        if self._last_error is not None:
            out["last_error"] = self._last_error.message
        return out
