"""Core commands: init, key, sign, verify, health, audit, config, keystore."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anyhsm.audit import VerifyResult
from anyhsm.cli.app import EXIT_NEGATIVE, EXIT_OK, App, Result, SubParsers, served, text_value
from anyhsm.errors import (
    AuthenticationFailed,
    ConfigError,
    HsmError,
    InvalidDigest,
    InvalidKeyMaterial,
    SecretOnCommandLine,
)
from anyhsm.fsutil import STDIN
from anyhsm.ops import SCHEMA_VERSION
from anyhsm.ops.admin import Rotation
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
    from anyhsm.ops import admin

    env = Environment(args.environment)
    network = Network(args.network)
    chain = admin.parse_chain(args.chain)
    providers: dict[str, dict[str, object]] = {
        "tpm": {"tcti": args.tcti},
        "pkcs11": {
            "module": args.pkcs11_module,
            "token_label": args.token_label,
            "token_serial": args.token_serial,
            "pin_file": args.pin_file,
            "wrap_key_label": args.wrap_key_label,
        },
    }
    consent = bool(args.allow_below_minimum)
    fast = bool(args.insecure_fast_kdf)
    # Every refusal that needs no device comes before the passphrase is asked for.
    admin.check_init(
        chain,
        environment=env,
        network=network,
        providers=providers,
        allow_below_minimum=consent,
        insecure_fast_kdf=fast,
    )
    pw = app.passphrase(prompt="New keystore passphrase: ", confirm=True)
    if pw is None:
        raise AuthenticationFailed(
            "no passphrase for the new keystore",
            hint="set ANYHSM_PASSPHRASE or pass --passphrase-file",
        )
    try:
        res = admin.init(
            Path(args.dir),
            pw,
            chain=chain,
            environment=env,
            network=network,
            providers=providers,
            allow_below_minimum=consent,
            insecure_fast_kdf=fast,
        )
    finally:
        pw.wipe()
    lines = [
        f"created keystore {res.keystore}",
        f"created audit log {res.audit_log}",
        f"chain: {', '.join(res.chain)}",
    ]
    lines += [f"enrolled: {e} (the passphrase stays the recovery path)" for e in res.enrolled]
    return Result(res.to_dict(), [*lines, str(res.config)])


# --- keys --------------------------------------------------------------------------------


def cmd_key_create(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.keys import create_key

    key_type = KeyType.parse(args.type)
    if args.show_mnemonic_once and not (key_type is KeyType.BIP32 and args.mnemonic_words):
        # Refused before the handle is opened (the passphrase is not asked for).
        raise HsmError(
            "--show-mnemonic-once needs --type bip32 --mnemonic-words N",
            hint="it shows the words of a new mnemonic, once",
        )
    made = create_key(
        app.hsm(),
        args.label,
        key_type,
        exportable=args.exportable,
        mnemonic_words=args.mnemonic_words if key_type is KeyType.BIP32 else None,
        show_mnemonic_once=args.show_mnemonic_once,
    )
    lines = key_text(made.info)
    if made.from_mnemonic and made.mnemonic is None:
        lines += [
            "",
            "the mnemonic was not shown: the seed exists only in the keystore "
            "(a backup display needs --exportable, [policy] allow_export = true "
            "and --show-mnemonic-once)",
        ]
    elif made.mnemonic is not None:
        lines += ["", "mnemonic (write it down now; it is shown only once):", made.mnemonic]
    return Result(made.to_dict(), lines)


_ARGUMENT_FORMS = (("mnemonic", "--mnemonic-file"), ("xprv", "--xprv-file"), ("wif", "--wif-file"))


def _refuse_secret_arguments(args: argparse.Namespace) -> None:
    """``--mnemonic``/``--xprv``/``--wif`` put the secret in argv, which every local user
    can read in /proc/PID/cmdline: refused, naming the file form, never echoing the value."""
    for name, file_form in _ARGUMENT_FORMS:
        if getattr(args, name, None) is not None:
            raise SecretOnCommandLine(
                f"--{name} takes the secret as a command-line argument, which other users "
                "can read (/proc/PID/cmdline, ps) and shells keep in their history; refused",
                hint=f"use {file_form} FILE (mode 600), or {file_form} - to read standard "
                "input (a prompt on a terminal)",
            )


def cmd_key_import(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops import keys

    _refuse_secret_arguments(args)
    sources = [
        s for s in (args.mnemonic_file, args.xprv_file, args.wif_file, args.secret_file) if s
    ]
    if len(sources) != 1:
        raise HsmError(
            "give exactly one of --mnemonic-file, --xprv-file, --wif-file or --secret-file",
            hint="FILE may be - to read standard input (a prompt on a terminal)",
        )
    if sources.count(STDIN) and args.bip39_passphrase_file == STDIN:
        raise HsmError("standard input can give only one secret")
    hsm = app.hsm()
    environment = hsm.config.environment
    if args.mnemonic_file:
        words = _secret_text(args.mnemonic_file, "mnemonic", environment)
        bip39_pw = os.environ.get("ANYHSM_BIP39_PASSPHRASE", "")
        if args.bip39_passphrase_file:
            bip39_pw = _secret_text(
                args.bip39_passphrase_file, "BIP39 passphrase", environment, strip=False
            )
        res = keys.import_mnemonic(hsm, args.label, words, bip39_pw, exportable=args.exportable)
    elif args.xprv_file:
        text = _secret_text(args.xprv_file, "xprv", environment)
        res = keys.import_xprv(hsm, args.label, text, exportable=args.exportable)
    elif args.wif_file:
        text = _secret_text(args.wif_file, "WIF", environment)
        res = keys.import_wif(hsm, args.label, text, exportable=args.exportable)
    else:
        from anyhsm.fsutil import read_secret_source

        with read_secret_source(args.secret_file, "secret", environment) as raw:
            res = keys.import_secret(
                hsm, args.label, raw, KeyType.parse(args.type), exportable=args.exportable
            )
    return Result(res.to_dict(), key_text(res.info) + [f"warning: {w}" for w in res.warnings])


def _secret_text(source: str, what: str, environment: Environment, *, strip: bool = True) -> str:
    """A secret read by the library's one secret-file rule (file or ``-``), as text; a
    file that is not UTF-8 is refused without quoting any of its bytes."""
    from anyhsm.fsutil import read_secret_source

    with read_secret_source(source, what, environment, prompt=f"{what}: ") as sb:
        try:
            text = sb.buffer.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidKeyMaterial(
                f"the {what} {'on standard input' if source == STDIN else 'file'} is not "
                "UTF-8 text",
                hint="it must hold only the secret, as text",
            ) from None
    return text.strip() if strip else text


@served
def cmd_key_list(args: argparse.Namespace, app: App) -> Result:
    res = app.backend().list_keys()
    lines = [
        f"{k.id}  {k.key_type.value:9}  {k.provider:9}  {k.label}"
        + ("" if k.available else f"  (unavailable: {k.provider} is not open here)")
        for k in res.keys
    ] or ["(no keys)"]
    return Result(res.to_dict(), lines)


@served
def cmd_key_show(args: argparse.Namespace, app: App) -> Result:
    info = app.backend().show_key(args.key)
    return Result(info.to_dict(), key_text(info))


def cmd_key_delete(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.keys import delete_key

    if not args.yes:
        raise HsmError("deleting a key is irreversible", hint="add --yes to confirm")
    res = delete_key(app.hsm(), args.key)
    return Result(res.to_dict(), [f"deleted {res.label} ({res.deleted})"])


def cmd_key_export(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.keys import export_key

    if not args.out:
        raise HsmError(
            "export writes the secret to a file only",
            hint="pass --out FILE (created 0600); secrets are never printed",
        )
    res = export_key(app.hsm(), args.key, Path(args.out))
    return Result(res.to_dict(), [f"wrote the secret of {res.label} to {res.out} (0600)"])


# --- sign / verify -----------------------------------------------------------------------


def _tweak(args: argparse.Namespace) -> bytes | None:
    from anyhsm.ops.data import hex_bytes

    return hex_bytes(args.tweak, "tweak") if args.tweak else None


@served
def cmd_sign(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.data import hex_bytes

    digest = hex_bytes(args.digest, "digest")
    scheme = SigScheme.parse(args.scheme)
    res = app.backend().sign(args.key, digest, scheme, args.path, _tweak(args))
    return Result(res.to_dict(), [res.signature.hex()])


@served
def cmd_verify(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.data import hex_bytes

    digest = hex_bytes(args.digest, "digest")
    sig = hex_bytes(args.signature, "signature")
    scheme = SigScheme.parse(args.scheme)
    res = app.backend().verify(args.key, digest, sig, scheme, args.path, _tweak(args))
    code = EXIT_OK if res.valid else EXIT_NEGATIVE
    return Result(res.to_dict(), ["valid" if res.valid else "INVALID"], code)


# --- health / audit / config -----------------------------------------------------------------


def _core_limit_text(limit: object) -> str:
    """The soft core-size limit as an operator reads it (-1 is RLIM_INFINITY)."""
    if limit is None:
        return "unknown"
    return "unlimited" if limit == -1 else f"{limit} bytes"


@served
def cmd_health(args: argparse.Namespace, app: App) -> Result:
    """The health object in every case: when the handle cannot be opened, ``ok`` is false,
    every provider's reason is listed, and the error is its ``error`` member; the exit
    status is then the error's (5 for a credential, 4 when every provider failed...)."""
    from anyhsm.errors import ProviderUnavailable

    res = app.backend().health()
    report = res.report
    if res.error is not None:
        print(f"anyhsm: error: {res.error}", file=sys.stderr)
    level = report.security_level.label if report.security_level else "none"
    minimum = report.min_security_level.label if report.min_security_level else "unknown"
    lines = [
        f"active provider: {report.active_provider or 'none'} (security level {level}, "
        f"minimum {minimum})",
        f"environment: {text_value(report.environment)}, network: {text_value(report.network)}",
    ]
    if res.error is not None:
        lines.append(f"NOT OK: {res.error.message}")
    for d in report.degraded_reasons:
        lines.append(f"DEGRADED ({d['code']}): {d['reason']}")
    for p in report.providers:
        extra = f" - {p['reason']}" if p.get("reason") else ""
        lines.append(f"  {p['name']:15} {p['status']:13} {p['elapsed_ms']:>9} ms{extra}")
    audit = report.audit
    lines.append(
        f"audit log: {text_value(audit.get('path'))} "
        f"(last entry {text_value(audit.get('last_seq'))})"
    )
    proc = report.process
    if proc:
        lines.append(
            f"process: dumpable {text_value(proc.get('dumpable'))}, core limit "
            f"{_core_limit_text(proc.get('core_limit'))}, secrets dontdump "
            f"{text_value(proc.get('dontdump_secrets'))} "
            f"(hardening {text_value(proc.get('hardening'))})"
        )
    if res.error is not None:
        code = res.error.exit_code
    else:
        code = EXIT_OK if report.ok else ProviderUnavailable.exit_code
    return Result(res.to_dict(), lines, code)


def _audit_exit(ok: bool) -> int:
    from anyhsm.errors import AuditTampered

    return EXIT_OK if ok else AuditTampered.exit_code


def cmd_audit_verify(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.admin import audit_verify

    res = audit_verify(app.hsm(verify_only=True))  # read-only: works on a damaged log
    text = (
        [f"audit log intact: {res.entries} entries (checkpoint at {res.checkpoint_seq})"]
        if res.ok
        else [f"AUDIT LOG TAMPERED: {res.reason}"]
    )
    return Result(res.to_dict(), text, _audit_exit(res.ok))


def _chain_line(res: VerifyResult) -> str:
    if res.ok:
        return f"audit chain verified: {res.entries} entries (chain {res.chain})"
    return f"AUDIT CHAIN BROKEN: {res.reason} (entries below are unverified)"


def cmd_audit_show(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.audit_query import AuditQuery, format_entry, parse_time
    from anyhsm.ops.admin import audit_show

    query = AuditQuery(
        op=args.op,
        key=args.key,
        outcome=args.outcome,
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        limit=args.limit,
    )
    found = audit_show(app.hsm(verify_only=True), query)  # read-only, works on a damaged log
    code = _audit_exit(found.verified)
    if app.json:  # JSON lines: one entry object per line, then one summary object
        import json

        lines = [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in found.entries]
        summary = {"schema_version": SCHEMA_VERSION, **found.summary()}
        lines.append(json.dumps(summary, sort_keys=True, separators=(",", ":")))
        return Result({}, lines=lines, exit_code=code)
    text = [_chain_line(found.verify)]
    text += [format_entry(e) for e in found.entries]
    text += [f"line {n}: unreadable (not an audit entry)" for n in found.unreadable_lines]
    text.append(f"{len(found.entries)} of {found.scanned} entries shown")
    return Result({}, lines=text, exit_code=code)


def cmd_audit_export(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.admin import audit_export

    res = audit_export(app.hsm(verify_only=True), Path(args.out))
    s = res.summary
    text = [
        _chain_line(res.verify),
        f"exported {s['lines']} lines to {s['out']} (sha256 {s['sha256']}); "
        f"summary in {s['summary']}",
    ]
    return Result(res.to_dict(), text, _audit_exit(res.verify.ok))


def cmd_config_check(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.admin import config_check

    res = config_check(app.config_path())
    lines = [str(p) for p in res.problems] or ["configuration OK"]
    return Result(res.to_dict(), lines, ConfigError.exit_code if res.errors else EXIT_OK)


@contextmanager
def current_passphrase(app: App, needed: bool = True) -> Iterator[SecretBytes | None]:
    """The current passphrase (--passphrase-file, ANYHSM_PASSPHRASE, the configured file or
    a prompt) when ``needed``, wiped afterwards: changing or rotating the keystore needs
    it even where a TPM or token opened the store; the handle checks it."""
    secret = app.passphrase(prompt="Current passphrase: ") if needed else None
    try:
        yield secret
    finally:
        if secret is not None:
            secret.wipe()


def rotation_text(res: Rotation, what: str) -> list[str]:
    s = res.summary
    return [
        what,
        f"every key ({text_value(s.get('keys'))}) re-encrypted under a fresh master key "
        f"(epoch {text_value(s.get('epoch'))}, generation {text_value(s.get('generation'))})",
        "the old master key, the old passphrase and saved copies of the old header or unlock "
        "blobs no longer open this keystore",
    ]


def cmd_keystore_passwd(args: argparse.Namespace, app: App) -> Result:
    """Change the passphrase and/or raise the KDF cost: a rotation to a fresh master key,
    so that the old passphrase and old copies of the header revoke nothing they opened."""
    from anyhsm.fsutil import read_secret_file
    from anyhsm.ops import admin

    cfg = app.config()
    new = (
        read_secret_file(Path(args.new_passphrase_file), "new passphrase", cfg.environment)
        if args.new_passphrase_file
        else None
    )
    try:
        # The production rules of init and the KDF's open time, before anything is opened.
        admin.check_passwd(cfg, new, allow_slow_open=args.allow_slow_open)
        if new is None:
            raise HsmError(
                "give the new passphrase in a file", hint="--new-passphrase-file FILE (0600)"
            )
        hsm = app.hsm()
        with current_passphrase(app) as current:
            res = admin.change_passphrase(
                hsm,
                current,
                new,
                allow_slow_open=args.allow_slow_open,
                on_slow=None if app.json else lambda note: print(note, file=sys.stderr, flush=True),
            )
    finally:
        if new is not None:
            new.wipe()
    return Result(res.to_dict(), rotation_text(res, "passphrase changed"))


def cmd_keystore_rotate(args: argparse.Namespace, app: App) -> Result:
    """A fresh master key, same passphrase: revokes copies of the old one (a leaked
    keystore backup plus passphrase opens nothing created after this)."""
    from anyhsm.ops.admin import rotate_master_key

    hsm = app.hsm()
    with current_passphrase(app) as current:
        res = rotate_master_key(hsm, current)
    return Result(res.to_dict(), rotation_text(res, "master key rotated"))


def cmd_audit_recover(args: argparse.Namespace, app: App) -> Result:
    """Start a new audit chain after an operator has accepted a loss (the log missing,
    shorter, swapped or replaced); the new chain's first entry records what was lost."""
    from anyhsm.ops.admin import audit_recover

    res = audit_recover(args.reason, lambda why: app.hsm(audit_recovery=why))
    d = res.detail
    return Result(
        res.to_dict(),
        [
            f"started audit chain {text_value(d.get('new_chain'))} after: "
            f"{text_value(d.get('found'))}",
            f"the old log was kept as {d.get('old_log_moved_to') or '(none was there)'}",
        ],
    )


def register(sub: SubParsers) -> None:
    p = sub.add_parser("init", help="create a software keystore, config file and audit log")
    p.add_argument("--dir", required=True, help="directory to create them in")
    p.add_argument(
        "--network",
        default="regtest",
        choices=[n.value for n in Network],
        help="the Bitcoin network of the deployment",
    )
    p.add_argument(
        "--environment",
        default="development",
        choices=[e.value for e in Environment],
        help="whose rules apply: the security floor, secret files, the KDF",
    )
    p.add_argument("--insecure-fast-kdf", action="store_true", help="cheap KDF for tests and demos")
    p.add_argument(
        "--chain",
        default="software",
        help="providers tried in order, comma-separated (default: software; production "
        "mainnet needs tpm,software or pkcs11,software)",
    )
    p.add_argument(
        "--tcti", help="the TPM for a tpm chain (default: device:/dev/tpmrm0); enrolled by init"
    )
    p.add_argument("--pkcs11-module", help="the vendor's PKCS#11 library, for a pkcs11 chain")
    p.add_argument("--token-label", help="the PKCS#11 token's label")
    p.add_argument(
        "--token-serial", help="the PKCS#11 token's serial (instead of, or with, the label)"
    )
    p.add_argument("--pin-file", help="a 0600 file with the token PIN (else ANYHSM_PKCS11_PIN)")
    p.add_argument(
        "--wrap-key-label",
        help="wrap the keystore master key with this AES key in the token (created there), so "
        "the keystore opens through the token; enrolled by init",
    )
    p.add_argument(
        "--allow-below-minimum",
        action="store_true",
        help="explicit consent to a chain below the environment's minimum security level "
        "(writes fallback.allow_below_minimum = true)",
    )
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
        help="for --type bip32: make it from a new BIP39 mnemonic (not shown unless "
        "--show-mnemonic-once)",
    )
    c.add_argument(
        "--show-mnemonic-once",
        action="store_true",
        help="show the new mnemonic once, as a backup; an export: needs --exportable and "
        "[policy] allow_export = true, and is audited",
    )
    c.add_argument("--exportable", action="store_true", help="allow 'key export' of it later")
    c.set_defaults(func=cmd_key_create)
    i = ks.add_parser(
        "import",
        help="import a key (mnemonic, xprv, WIF or raw secret) from a file or standard input",
    )
    i.add_argument("--label", required=True)
    i.add_argument("--mnemonic-file", metavar="FILE", help="BIP39 words; - for standard input")
    i.add_argument(
        "--bip39-passphrase-file",
        metavar="FILE",
        help="file holding the BIP39 passphrase (or set ANYHSM_BIP39_PASSPHRASE)",
    )
    i.add_argument("--xprv-file", metavar="FILE", help="master extended private key; - for stdin")
    i.add_argument("--wif-file", metavar="FILE", help="WIF private key; - for standard input")
    i.add_argument("--secret-file", metavar="FILE", help="hex secret; - for standard input")
    # The argument forms are refused (the secret would be in argv). They stay defined,
    # swallowing any number of words, so that argparse never echoes an unquoted mnemonic
    # as "unrecognized arguments".
    for name in ("--mnemonic", "--xprv", "--wif"):
        i.add_argument(name, nargs="*", help=argparse.SUPPRESS)
    i.add_argument(
        "--type", default="secp256k1", help="with --secret-file: secp256k1 | bip32 (a seed)"
    )
    i.add_argument("--exportable", action="store_true", help="allow 'key export' of it later")
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
    sg.add_argument(
        "--scheme", default="ecdsa", choices=["ecdsa", "schnorr"], help="signature scheme"
    )
    sg.add_argument(
        "--path", help="HD keys: the child at this BIP32 path signs (default: the key itself)"
    )
    sg.add_argument("--tweak", metavar="HEX", help="a 32-byte BIP341 tweak (schnorr)")
    sg.set_defaults(func=cmd_sign)
    v = sub.add_parser("verify", help="verify a signature of a digest")
    v.add_argument("--key", required=True)
    v.add_argument("--digest", required=True)
    v.add_argument("--signature", required=True)
    v.add_argument(
        "--scheme", default="ecdsa", choices=["ecdsa", "schnorr"], help="signature scheme"
    )
    v.add_argument(
        "--path", help="HD keys: the child at this BIP32 path signs (default: the key itself)"
    )
    v.add_argument("--tweak", metavar="HEX", help="a 32-byte BIP341 tweak (schnorr)")
    v.set_defaults(func=cmd_verify)

    sub.add_parser("health", help="which provider is active and how each fared").set_defaults(
        func=cmd_health
    )
    a = sub.add_parser("audit", help="audit log")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    asub.add_parser("verify", help="check the audit log chain").set_defaults(func=cmd_audit_verify)
    rc = asub.add_parser(
        "recover", help="start a new chain after a recorded loss (log missing, cut or swapped)"
    )
    rc.add_argument("--reason", required=True, help="why the loss is accepted (recorded)")
    rc.set_defaults(func=cmd_audit_recover)
    sh = asub.add_parser(
        "show",
        help="print matching entries after verifying the chain (read-only); "
        "--json: JSON lines, one entry per line, then a summary line",
    )
    sh.add_argument("--op", help="only this operation (e.g. sign, create_key) (default: all)")
    sh.add_argument("--key", help="only entries about this key id (default: all)")
    sh.add_argument("--outcome", help="only this outcome (ok, error, refused, ...) (default: all)")
    sh.add_argument("--since", metavar="ISO", help="from this time, inclusive (UTC if no zone)")
    sh.add_argument("--until", metavar="ISO", help="before this time, exclusive (UTC if no zone)")
    sh.add_argument("--limit", type=int, metavar="N", help="the last N matches (default: all)")
    sh.set_defaults(func=cmd_audit_show)
    ex = asub.add_parser(
        "export", help="copy the log and a verification summary to 0600 files (read-only)"
    )
    ex.add_argument("--out", required=True, metavar="FILE", help="the copy (FILE.summary.json too)")
    ex.set_defaults(func=cmd_audit_export)
    cf = sub.add_parser("config", help="configuration")
    csub = cf.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("check", help="report every configuration problem").set_defaults(
        func=cmd_config_check
    )
    kst = sub.add_parser("keystore", help="keystore maintenance")
    kss = kst.add_subparsers(dest="keystore_cmd", required=True)
    pw = kss.add_parser("passwd", help="change passphrase / raise KDF cost")
    pw.add_argument("--new-passphrase-file", required=False)
    pw.add_argument(
        "--allow-slow-open",
        action="store_true",
        help="accept a KDF slower than the provider's open timeout (default: refused)",
    )
    pw.set_defaults(func=cmd_keystore_passwd)
    kss.add_parser(
        "rotate", help="re-encrypt every key under a fresh master key (same passphrase)"
    ).set_defaults(func=cmd_keystore_rotate)
