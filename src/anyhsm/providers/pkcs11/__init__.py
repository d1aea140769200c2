"""The PKCS#11 provider as a package, like ``anyhsm.tpm``: one module per job.

- ``provider``: :class:`Pkcs11Provider` (keys generated in the token, signing, health)
- ``settings``: the ``[providers.pkcs11]`` table and where the PIN comes from
- ``module``, ``lib``, ``cryptoki``: loading the vendor's module, calling it safely
- ``conn``, ``pool``: sessions, login, reconnect
- ``keys``: finding and creating key objects; ``errors``: CKR codes -> typed errors
- ``wrap``: the keystore master key wrapped by an AES key in the token (``pkcs11-wrapped``)

Nothing here is imported until a chain names a PKCS#11 provider; this file imports nothing.
"""
