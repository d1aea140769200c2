"""Core commands: init, key, sign, verify, health, audit, config, keystore."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from anyhsm.cli.app import App, Result, SubParsers
from anyhsm.config import Config
from anyhsm.errors import ConfigError, HsmError, InvalidDigest
from anyhsm.hsm import Hsm
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, KeyInfo, KeyType, Network, SigScheme


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise InvalidDigest(f"{what} is not valid hexadecimal") from None


def key_text(info: KeyInfo) -> list[str]:
    return [
        f"id:          {info.id}",
        f"label:       {info.label}",
        f"type:        {info.key_type.value}",
        f"provider:    {info.provider}",
        f"public key:  {info.public_key.hex()}",
        f"created:     {info.created_at}",
    ]


# --- init -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.deploy import FAST_DEV_KDF, init_deployment

    env = Environment(args.environment)
    if args.insecure_fast_kdf and env is Environment.PRODUCTION:
        raise ConfigError("--insecure-fast-kdf is refused in production")
    pw = app.passphrase(prompt="New keystore passphrase: ", confirm=True)
    if pw is None:
        raise HsmError(
            "no passphrase for the new keystore",
            hint="set ANYHSM_PASSPHRASE or pass --passphrase-file",
        )
    path = init_deployment(
        Path(args.dir),
        pw,
        network=Network(args.network),
        environment=env,
        kdf=FAST_DEV_KDF if args.insecure_fast_kdf else None,
    )
    directory = path.parent
    return Result(
        {
            "config": str(path),
            "keystore": str(directory / "keystore"),
            "audit_log": str(directory / "audit.log"),
        },
        [
            f"created keystore {directory / 'keystore'}",
            f"created audit log {directory / 'audit.log'}",
            str(path),
        ],
    )


# --- keys --------------------------------------------------------------------------------


def cmd_key_create(args: argparse.Namespace, app: App) -> Result:
    key_type = KeyType.parse(args.type)
    hsm = app.hsm()
    if key_type is KeyType.BIP32 and args.mnemonic_words:
        from anyhsm.bitcoin.bip39 import generate_mnemonic, mnemonic_to_seed

        words = generate_mnemonic(args.mnemonic_words)
        with mnemonic_to_seed(words) as seed:
            info = hsm.import_key(args.label, seed, KeyType.BIP32, exportable=args.exportable)
        data = info.to_dict()
        data["mnemonic"] = words
        return Result(
            data,
            [*key_text(info), "", "mnemonic (write it down now; it is shown only once):", words],
        )
    info = hsm.generate_key(args.label, key_type, exportable=args.exportable)
    return Result(info.to_dict(), key_text(info))


def cmd_key_import(args: argparse.Namespace, app: App) -> Result:
    hsm = app.hsm()
    sources = [s for s in (args.mnemonic, args.xprv, args.wif, args.secret_file) if s]
    if len(sources) != 1:
        raise HsmError(
            "give exactly one of --mnemonic, --xprv, --wif or --secret-file",
            hint="secrets may also be read from a file to keep them out of shell history",
        )
    if args.mnemonic:
        from anyhsm.bitcoin.bip39 import mnemonic_to_seed, validate_mnemonic

        words = _maybe_file(args.mnemonic)
        validate_mnemonic(words)
        bip39_pw = os.environ.get("ANYHSM_BIP39_PASSPHRASE", "")
        if args.bip39_passphrase_file:
            bip39_pw = Path(args.bip39_passphrase_file).read_text(encoding="utf-8").rstrip("\r\n")
        with mnemonic_to_seed(words, bip39_pw) as seed:
            info = hsm.import_key(args.label, seed, KeyType.BIP32, exportable=args.exportable)
    elif args.xprv:
        info = _import_xprv(hsm, args.label, _maybe_file(args.xprv), args.exportable)
    elif args.wif:
        from anyhsm.bitcoin.address import wif_decode

        secret, networks, _compressed = wif_decode(_maybe_file(args.wif))
        with secret:
            if hsm.network not in networks:
                from anyhsm.errors import NetworkMismatch

                raise NetworkMismatch(
                    f"the WIF key is for {sorted(n.value for n in networks)}, "
                    f"not the configured {hsm.network.value}"
                )
            info = hsm.import_key(args.label, secret, KeyType.SECP256K1, exportable=args.exportable)
    else:
        raw = Path(args.secret_file).read_bytes().strip()
        with SecretBytes(_hex(raw.decode("utf-8", "replace"), "secret file")) as sb:
            info = hsm.import_key(
                args.label, sb, KeyType.parse(args.type), exportable=args.exportable
            )
    return Result(info.to_dict(), key_text(info))


def _import_xprv(hsm: Hsm, label: str, text: str, exportable: bool) -> KeyInfo:
    """Import a master xprv as an HD node (chain code || key)."""
    from anyhsm.bitcoin.bip32 import ExtendedKey
    from anyhsm.errors import Bip32Error, NetworkMismatch

    with ExtendedKey.parse(text) as xkey:
        if not xkey.is_private:
            raise Bip32Error("an xpub holds no private key", hint="import the xprv")
        if xkey.depth != 0:
            raise Bip32Error(
                f"this xprv is at depth {xkey.depth}; PSBT signing matches keys by their master "
                "fingerprint, which a non-master xprv cannot give",
                hint="import the master xprv or the mnemonic",
            )
        if hsm.network not in xkey.networks:
            raise NetworkMismatch(
                f"the xprv is for {sorted(n.value for n in xkey.networks)}, "
                f"not the configured {hsm.network.value}"
            )
        with xkey.secret() as secret, SecretBytes(64) as node:
            node.buffer[:32] = xkey.chain_code
            node.buffer[32:] = secret.buffer
            return hsm.import_key(label, node, KeyType.BIP32_NODE, exportable=exportable)


def _maybe_file(value: str) -> str:
    """``@path`` reads the value from a file (keeps secrets out of argv and history)."""
    if value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8", errors="replace").strip()
    return value.strip()


def cmd_key_list(args: argparse.Namespace, app: App) -> Result:
    keys = app.hsm().list_keys()
    lines = [f"{k.id}  {k.key_type.value:9}  {k.provider:9}  {k.label}" for k in keys] or [
        "(no keys)"
    ]
    return Result({"keys": [k.to_dict() for k in keys]}, lines)


def cmd_key_show(args: argparse.Namespace, app: App) -> Result:
    info = app.hsm().get_key(args.key)
    return Result(info.to_dict(), key_text(info))


def cmd_key_delete(args: argparse.Namespace, app: App) -> Result:
    if not args.yes:
        raise HsmError("deleting a key is irreversible", hint="add --yes to confirm")
    hsm = app.hsm()
    info = hsm.get_key(args.key)
    hsm.delete_key(info.id)
    return Result({"deleted": info.id, "label": info.label}, [f"deleted {info.label} ({info.id})"])


def cmd_key_export(args: argparse.Namespace, app: App) -> Result:
    if not args.out:
        raise HsmError(
            "export writes the secret to a file only",
            hint="pass --out FILE (created 0600); secrets are never printed",
        )
    from anyhsm.fsutil import atomic_write

    hsm = app.hsm()
    info = hsm.get_key(args.key)
    with hsm.export_key(info.id) as secret:
        atomic_write(Path(args.out), secret.buffer.hex().encode() + b"\n")
    return Result(
        {"exported": info.id, "out": args.out},
        [f"wrote the secret of {info.label} to {args.out} (0600)"],
    )


# --- sign / verify -----------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace, app: App) -> Result:
    digest = _hex(args.digest, "digest")
    scheme = SigScheme.parse(args.scheme)
    sig = app.hsm().sign(args.key, digest, scheme)
    return Result({"signature": sig.hex(), "scheme": scheme.value, "key": args.key}, [sig.hex()])


def cmd_verify(args: argparse.Namespace, app: App) -> Result:
    digest = _hex(args.digest, "digest")
    sig = _hex(args.signature, "signature")
    scheme = SigScheme.parse(args.scheme)
    ok = app.hsm().verify(args.key, digest, sig, scheme)
    return Result({"valid": ok}, ["valid" if ok else "INVALID"], 0 if ok else 1)


# --- health / audit / config -----------------------------------------------------------------


def cmd_health(args: argparse.Namespace, app: App) -> Result:
    report = app.hsm().health()
    lines = [
        f"active provider: {report.active_provider} (security level {report.security_level.label}, "
        f"minimum {report.min_security_level.label})",
        f"environment: {report.environment}, network: {report.network}",
    ]
    for p in report.providers:
        extra = f" - {p['reason']}" if p.get("reason") else ""
        lines.append(f"  {p['name']:15} {p['status']:13} {p['elapsed_ms']:>9} ms{extra}")
    lines.append(
        f"audit log: {report.audit.get('path')} (last entry {report.audit.get('last_seq')})"
    )
    return Result(report.to_dict(), lines, 0 if report.ok else 4)


def cmd_audit_verify(args: argparse.Namespace, app: App) -> Result:
    res = app.hsm().verify_audit()
    text = (
        [f"audit log intact: {res.entries} entries (checkpoint at {res.checkpoint_seq})"]
        if res.ok
        else [f"AUDIT LOG TAMPERED: {res.reason}"]
    )
    return Result(res.to_dict(), text, 0 if res.ok else 8)


def cmd_config_check(args: argparse.Namespace, app: App) -> Result:
    import tomllib

    path = app.config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    import os

    from anyhsm.config import apply_env_overrides, structural_problems

    merged = apply_env_overrides(raw, os.environ)
    problems = structural_problems(merged)
    if not [p for p in problems if p.severity == "error"]:
        cfg = Config.from_mapping(raw, config_dir=path.resolve().parent, source=path)
        problems = cfg.check()
    errors = [p for p in problems if p.severity == "error"]
    lines = [str(p) for p in problems] or ["configuration OK"]
    return Result(
        {"ok": not errors, "problems": [p.to_dict() for p in problems]},
        lines,
        3 if errors else 0,
    )


def cmd_keystore_passwd(args: argparse.Namespace, app: App) -> Result:
    """Change the passphrase and/or raise the KDF cost (re-wraps the master key only)."""
    from anyhsm.factory import provider_context
    from anyhsm.keystore import KdfParams, Keystore
    from anyhsm.providers.software import keystore_path

    cfg = app.config()
    old = app.passphrase(prompt="Current passphrase: ")
    if old is None:
        raise HsmError("no current passphrase", hint="set ANYHSM_PASSPHRASE or --passphrase-file")
    if not args.new_passphrase_file:
        raise HsmError(
            "give the new passphrase in a file", hint="--new-passphrase-file FILE (0600)"
        )
    from anyhsm.factory import read_secret_file

    new = read_secret_file(Path(args.new_passphrase_file), "new passphrase")
    ks = Keystore.load(keystore_path(provider_context(cfg, "software", None)))
    ks.unlock_with_passphrase(old)
    try:
        ks.change_passphrase(
            new, KdfParams.from_settings(cfg.provider_settings("software").get("kdf"))
        )
    finally:
        ks.close()
        old.wipe()
        new.wipe()
    return Result({"changed": True}, ["passphrase and KDF parameters updated"])


def register(sub: SubParsers) -> None:
    p = sub.add_parser("init", help="create a software keystore, config file and audit log")
    p.add_argument("--dir", required=True, help="directory to create them in")
    p.add_argument("--network", default="regtest", choices=[n.value for n in Network])
    p.add_argument("--environment", default="development", choices=[e.value for e in Environment])
    p.add_argument("--insecure-fast-kdf", action="store_true", help="cheap KDF for tests and demos")
    p.set_defaults(func=cmd_init)

    key = sub.add_parser("key", help="create, list, show, delete, import, export keys")
    ks = key.add_subparsers(dest="key_cmd", required=True)
    c = ks.add_parser("create", help="create a key in the active provider")
    c.add_argument("--label", required=True)
    c.add_argument("--type", default="secp256k1", help="secp256k1 | bip32")
    c.add_argument(
        "--mnemonic-words",
        type=int,
        choices=[12, 15, 18, 21, 24],
        help="for --type bip32: make it from a new BIP39 mnemonic (shown once)",
    )
    c.add_argument("--exportable", action="store_true")
    c.set_defaults(func=cmd_key_create)
    i = ks.add_parser("import", help="import a key (mnemonic, xprv, WIF or raw secret file)")
    i.add_argument("--label", required=True)
    i.add_argument("--mnemonic", help="BIP39 words, or @FILE")
    i.add_argument(
        "--bip39-passphrase-file",
        help="file holding the BIP39 passphrase (or set ANYHSM_BIP39_PASSPHRASE)",
    )
    i.add_argument("--xprv", help="extended private key, or @FILE")
    i.add_argument("--wif", help="WIF private key, or @FILE")
    i.add_argument("--secret-file", help="file holding a hex secret")
    i.add_argument("--type", default="secp256k1")
    i.add_argument("--exportable", action="store_true")
    i.set_defaults(func=cmd_key_import)
    ks.add_parser("list", help="list keys").set_defaults(func=cmd_key_list)
    s = ks.add_parser("show", help="show one key")
    s.add_argument("key", help="id or label")
    s.set_defaults(func=cmd_key_show)
    d = ks.add_parser("delete", help="delete a key (irreversible)")
    d.add_argument("key")
    d.add_argument("--yes", action="store_true")
    d.set_defaults(func=cmd_key_delete)
    e = ks.add_parser("export", help="export an exportable key's secret to a 0600 file")
    e.add_argument("key")
    e.add_argument("--out")
    e.set_defaults(func=cmd_key_export)

    sg = sub.add_parser("sign", help="sign a 32-byte digest")
    sg.add_argument("--key", required=True)
    sg.add_argument("--digest", required=True, help="32 bytes, hex")
    sg.add_argument("--scheme", default="ecdsa", choices=["ecdsa", "schnorr"])
    sg.set_defaults(func=cmd_sign)
    v = sub.add_parser("verify", help="verify a signature of a digest")
    v.add_argument("--key", required=True)
    v.add_argument("--digest", required=True)
    v.add_argument("--signature", required=True)
    v.add_argument("--scheme", default="ecdsa", choices=["ecdsa", "schnorr"])
    v.set_defaults(func=cmd_verify)

    sub.add_parser("health", help="which provider is active and how each fared").set_defaults(
        func=cmd_health
    )
    a = sub.add_parser("audit", help="audit log")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    asub.add_parser("verify", help="check the audit log chain").set_defaults(func=cmd_audit_verify)
    cf = sub.add_parser("config", help="configuration")
    csub = cf.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("check", help="report every configuration problem").set_defaults(
        func=cmd_config_check
    )
    kst = sub.add_parser("keystore", help="keystore maintenance")
    kss = kst.add_subparsers(dest="keystore_cmd", required=True)
    pw = kss.add_parser("passwd", help="change passphrase / raise KDF cost")
    pw.add_argument("--new-passphrase-file", required=False)
    pw.set_defaults(func=cmd_keystore_passwd)
