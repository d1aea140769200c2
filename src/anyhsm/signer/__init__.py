"""``anyhsm-signer``: Bitcoin Core's external signer protocol over the operations layer.

``bitcoind -signer=<cmd>`` runs ``<cmd>`` as a child process for each wallet operation
that needs keys it does not hold (``enumeratesigners``, ``createwallet ...
external_signer=true``, ``walletdisplayaddress``, signing in ``send``/``walletprocesspsbt``),
reads the first line of its standard output as JSON, and ignores everything else. This
package speaks that protocol, exactly as Core calls it (docs/bitcoin-core.md, "The
protocol", records what Core sends, version by version, with the sources):

- :mod:`anyhsm.signer.protocol`: the command line (both argument styles Core has used,
  ``--stdin``), the chains, HWI's numbered errors, the one JSON line; no keys, no handle.
- :mod:`anyhsm.signer.keyindex`: the public, non-secret index of the store's HD keys
  (label, id, master fingerprint, provider) that lets ``enumerate`` answer fast and
  without the keystore passphrase, and the rule that picks the one key exposed.
- :mod:`anyhsm.signer.commands`: enumerate, getdescriptors, displayaddress, signtx (and
  ``setup``, which writes the index): each a thin call into :mod:`anyhsm.ops`.
- :mod:`anyhsm.signer.main`: the console script's ``main``.

Importing this package imports nothing else, so that ``enumerate`` stays cheap.
"""
