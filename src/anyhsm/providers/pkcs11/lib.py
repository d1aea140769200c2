"""python-pkcs11's ``lib`` with the C_Initialize call taken over by anyhsm.

Imported only when a PKCS#11 module is actually loaded (it imports python-pkcs11).
``pkcs11._pkcs11.lib.__init__`` calls ``self.initialize()``, which would pass NULL
init args; overriding that one method lets anyhsm initialise the module itself
(with OS locking when asked, and tolerating a module already initialised by other
code in the process), while python-pkcs11 still provides slots, sessions and objects.
"""

from __future__ import annotations

from collections.abc import Callable

from pkcs11 import _pkcs11

# path -> the callable that performs C_Initialize for that module (set by the registry).
_INIT_HOOKS: dict[str, Callable[[], None]] = {}


class HookedLib(_pkcs11.lib):
    """A loaded module whose initialisation is done by anyhsm's registry."""

    def initialize(self) -> None:
        hook = _INIT_HOOKS.get(self.so)
        if hook is not None:
            hook()


def load(path: str, initialize: Callable[[], None]) -> HookedLib:
    """dlopen ``path`` through python-pkcs11, initialising it with ``initialize``."""
    _INIT_HOOKS[path] = initialize
    return HookedLib(path)
