"""The operations layer: one function per user-visible operation, shared by every front end.

The ``anyhsm`` CLI, the Bitcoin Core external signer (``anyhsm-signer``) and the HTTP
service are thin shells over these functions: they parse their input, call one
operation, and print or send what it returns. HWI's ``hwilib/commands.py`` under its
``_cli.py`` is the model.

Every operation takes the handle (:class:`anyhsm.hsm.Hsm`) or a configuration and typed
arguments, and returns plain typed data: a frozen dataclass (or a library value type)
with ``to_dict() -> dict[str, object]``, which is what ``--json`` prints. Operations
never print, parse a command line, exit the process or write ``os.environ``; they raise
the errors of :mod:`anyhsm.errors`, whose ``exit_code`` a front end turns into its exit
status. Secrets come in as :class:`anyhsm.secret.SecretBytes` (or from the credential
sources of :mod:`anyhsm.credentials`), never as command-line text.

Modules, by area (import the one you need; this package imports none of them, so that a
front end's start-up loads only what its command uses):

- :mod:`anyhsm.ops.session`: opening the handle as every front end does (the credential
  rules of :mod:`anyhsm.credentials`; no prompt unless the front end gives one).
- :mod:`anyhsm.ops.keys`: create, import (mnemonic, xprv, WIF, raw secret), list, show,
  delete, export.
- :mod:`anyhsm.ops.signing`: sign and verify a 32-byte digest; a batch.
- :mod:`anyhsm.ops.bitcoin`: xpub, address, descriptors, message sign and verify.
- :mod:`anyhsm.ops.psbt`: parse, inspect (with the fee), sign, finalize, create, combine.
- :mod:`anyhsm.ops.admin`: init, health, audit verify/show/export/recover, config check,
  keystore passwd/rotate.
- :mod:`anyhsm.ops.enrol`: TPM and token-wrap enrolment, unenrolment and status.
"""

SCHEMA_VERSION = 1
"""The version of the JSON shapes the operations return (``schema_version`` in every
object the CLI prints under ``--json``). Adding a member keeps it; removing or renaming a
member, or changing a member's type or meaning, raises it (see docs/cli.md)."""
