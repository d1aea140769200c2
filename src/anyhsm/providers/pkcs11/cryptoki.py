"""A minimal ctypes view of a module's function list, for the calls python-pkcs11 does not
expose the way anyhsm needs them.

- ``C_Initialize`` with ``CKF_OS_LOCKING_OK``: python-pkcs11 passes NULL, which tells a
  module such as SoftHSM2 that the application is single-threaded, so it drops its own
  mutexes and crashes when two threads call it (seen 5 of 5 runs here).
- ``C_Login`` from a ``bytearray``: python-pkcs11 wants the PIN as ``str`` and leaks the
  session it opened when the login fails; here the PIN goes from a wipeable buffer straight
  to the module, and the session is ours to close.
- ``C_Logout``, ``C_GetSessionInfo`` (is this session still logged in?), and
  ``C_CloseAllSessions`` (used by tests as fault injection).

Only the head of ``CK_FUNCTION_LIST`` is declared: the version and the first twenty
function pointers, whose order is fixed by the PKCS#11 standard since v2.01.
"""

from __future__ import annotations

import ctypes
import sys

from anyhsm.errors import ProviderUnavailable

CK_ULONG = ctypes.c_ulong
CKF_OS_LOCKING_OK = 0x00000002
CKU_USER = 1
CKS_RO_USER_FUNCTIONS = 1
CKS_RW_USER_FUNCTIONS = 3

_FUNCTION_NAMES = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
)


class _CkVersion(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _CkFunctionListHead(ctypes.Structure):
    # PKCS#11 asks for 1-byte packing on Windows only; elsewhere natural alignment.
    if sys.platform == "win32":  # pragma: no cover - not supported here
        _pack_ = 1
    _fields_ = (("version", _CkVersion), *((n, ctypes.c_void_p) for n in _FUNCTION_NAMES))


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    )


class _CkSessionInfo(ctypes.Structure):
    _fields_ = (
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    )


_PTR_FN = ctypes.CFUNCTYPE(CK_ULONG, ctypes.c_void_p)
_ULONG_FN = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG)
_LOGIN_FN = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, CK_ULONG, ctypes.c_void_p, CK_ULONG)
_SESSION_INFO_FN = ctypes.CFUNCTYPE(CK_ULONG, CK_ULONG, ctypes.POINTER(_CkSessionInfo))


class Cryptoki:
    """The few raw entry points of one loaded module; every method returns the ``CK_RV``."""

    def __init__(self, path: str) -> None:
        try:
            self._dll = ctypes.CDLL(path)
            get_list = self._dll.C_GetFunctionList
        except (OSError, AttributeError) as exc:
            raise ProviderUnavailable(
                f"cannot load the PKCS#11 module {path}: {exc}",
                hint="check the module path and that its dependencies are installed (ldd MODULE)",
            ) from None
        get_list.restype = CK_ULONG
        get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead)),)
        head = ctypes.POINTER(_CkFunctionListHead)()
        rv = int(get_list(ctypes.byref(head)))
        if rv != 0 or not head:
            raise ProviderUnavailable(
                f"the PKCS#11 module {path} returned no function list (rv {rv:#x})",
                hint="is this really a PKCS#11 module?",
            )
        fl = head.contents
        self.version = (int(fl.version.major), int(fl.version.minor))
        self._initialize = _PTR_FN(fl.C_Initialize)
        self._finalize = _PTR_FN(fl.C_Finalize)
        self._close_all = _ULONG_FN(fl.C_CloseAllSessions)
        self._session_info = _SESSION_INFO_FN(fl.C_GetSessionInfo)
        self._login = _LOGIN_FN(fl.C_Login)
        self._logout = _ULONG_FN(fl.C_Logout)

    def initialize(self, os_locking: bool) -> int:
        if not os_locking:
            return int(self._initialize(None))
        args = _CkInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return int(self._initialize(ctypes.addressof(args)))

    def finalize(self) -> int:
        return int(self._finalize(None))

    def login(self, session: int, pin: bytearray) -> int:
        """C_Login as the normal user, reading the PIN from ``pin`` in place."""
        if not pin:
            return int(self._login(session, CKU_USER, None, 0))
        buf = (ctypes.c_char * len(pin)).from_buffer(pin)
        return int(self._login(session, CKU_USER, ctypes.addressof(buf), len(pin)))

    def logout(self, session: int) -> int:
        return int(self._logout(session))

    def session_state(self, session: int) -> tuple[int, int]:
        """(rv, CKS_* state) of a session."""
        info = _CkSessionInfo()
        rv = int(self._session_info(session, ctypes.byref(info)))
        return rv, int(info.state)

    def close_all_sessions(self, slot_id: int) -> int:
        return int(self._close_all(slot_id))


def handle_of(session: object) -> int:
    """The CK_SESSION_HANDLE of a python-pkcs11 session (its typing stub omits it)."""
    return int(session.handle)  # type: ignore[attr-defined]


def logged_in_state(state: int) -> bool:
    return state in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS)
