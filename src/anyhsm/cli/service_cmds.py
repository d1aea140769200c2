"""The signing service's commands: ``anyhsm serve`` and ``anyhsm service add-client|list-clients``.

``serve`` runs :func:`anyhsm.service.server.serve` in the foreground (needs the
``server`` extra; nothing of it is imported before the command runs). ``add-client``
writes a ``[[service.clients]]`` table with the token's salted hash only into the
configuration file (atomically, checked by loading the result first) and prints the token
once, as the last line of its output: it is never stored and cannot be shown again.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from anyhsm.cli.app import App, Result, SubParsers
from anyhsm.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from pathlib import Path


def _server_extra() -> None:
    import importlib.util

    missing = [m for m in ("aiohttp", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"the signing service needs {', '.join(missing)} (the 'server' extra)",
            hint="pip install 'anyhsm[server]'",
        )


def cmd_serve(args: argparse.Namespace, app: App) -> Result:
    _server_extra()
    from anyhsm.service.server import serve

    code = serve(app.config_path(), args.listen)
    return Result({"stopped": True}, [], code)


def _list(text: str, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise UsageError(f"{what} must name at least one item")
    return items


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, with ensure_ascii)."""
    import json

    return json.dumps(text, ensure_ascii=True)


def client_table(
    name: str,
    token_hash: str,
    keys: tuple[str, ...],
    ops: tuple[str, ...],
    cert_sha256: str | None = None,
    rate_limit_per_s: float | None = None,
) -> str:
    lines = [
        "",
        "[[service.clients]]",
        f"name = {_toml_string(name)}",
        f"token_hash = {_toml_string(token_hash)}",
        f"keys = [{', '.join(_toml_string(k) for k in keys)}]",
        f"ops = [{', '.join(_toml_string(o) for o in ops)}]",
    ]
    if cert_sha256 is not None:
        lines.append(f"cert_sha256 = {_toml_string(cert_sha256)}")
    if rate_limit_per_s is not None:
        lines.append(f"rate_limit_per_s = {rate_limit_per_s!r}")
    return "\n".join(lines) + "\n"


def add_client(
    config_path: Path,
    name: str,
    keys: tuple[str, ...],
    ops: tuple[str, ...],
    *,
    cert_sha256: str | None = None,
    rate_limit_per_s: float | None = None,
) -> str:
    """Append the client to the configuration file (atomically, after checking that the
    result loads and declares it) and return its new token."""
    import os
    import tomllib

    from anyhsm.config import Config
    from anyhsm.fsutil import atomic_write
    from anyhsm.service.settings import CERT_SHA256, ClientSpec, Op, from_config
    from anyhsm.service.tokens import hash_token, new_token

    try:
        op_set = frozenset(Op(o) for o in ops)
    except ValueError:
        raise UsageError(
            f"--ops: unknown operation in {','.join(ops)!r}",
            hint="use " + ", ".join(o.value for o in Op),
        ) from None
    cert = cert_sha256.replace(":", "").lower() if cert_sha256 else None
    if cert is not None and not CERT_SHA256.fullmatch(cert):
        raise UsageError("--cert-sha256 must be the 64 hex digits of a SHA-256")
    token = new_token()
    digest = hash_token(token)
    ClientSpec(name, digest, keys, op_set, cert)  # the name, keys and ops are valid
    current = from_config(Config.load(config_path))
    if any(c.name == name for c in current.clients):
        raise UsageError(f"a service client named {name!r} already exists in {config_path}")
    text = config_path.read_text(encoding="utf-8")
    new_text = text + ("" if text.endswith("\n") or not text else "\n")
    new_text += client_table(name, digest, keys, ops, cert, rate_limit_per_s)
    try:
        raw = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"cannot add the client to {config_path}: the result is not valid TOML ({e})",
            hint="the file may declare service.clients inline; add the table by hand",
        ) from None
    cfg = Config.from_mapping(raw, config_dir=config_path.resolve().parent, source=config_path)
    if not any(c.name == name for c in from_config(cfg).clients):
        raise ConfigError(f"the client {name!r} does not load back from {config_path}")
    mode = os.stat(config_path).st_mode & 0o777
    atomic_write(config_path, new_text.encode("utf-8"), mode)
    return token


def cmd_add_client(args: argparse.Namespace, app: App) -> Result:
    path = app.config_path()
    keys = _list(args.keys, "--keys")
    ops = _list(args.ops, "--ops")
    token = add_client(
        path,
        args.name,
        keys,
        ops,
        cert_sha256=args.cert_sha256,
        rate_limit_per_s=args.rate_limit,
    )
    data: dict[str, object] = {
        "client": args.name,
        "keys": list(keys),
        "ops": list(ops),
        "config": str(path),
        "token": token,
    }
    text = [
        f"client {args.name!r} added to {path} (keys {', '.join(keys)}; ops {', '.join(ops)})",
        "reload a running service to use it: kill -HUP <pid> (or systemctl reload anyhsm)",
        "its token, shown this once (only its hash is stored):",
        token,
    ]
    return Result(data, text)


def cmd_list_clients(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.service.settings import from_config

    settings = from_config(app.config())
    clients = [
        {
            "name": c.name,
            "keys": list(c.keys),
            "ops": sorted(o.value for o in c.ops),
            "cert_bound": c.cert_sha256 is not None,
        }
        for c in settings.clients
    ]
    text = [
        f"{c['name']}: keys {', '.join(c['keys'])}; ops {', '.join(c['ops'])}"  # type: ignore[arg-type]
        + ("; certificate-bound" if c["cert_bound"] else "")
        for c in clients
    ] or ["no service clients"]
    return Result({"listen": str(settings.listen), "clients": clients}, text)


def register(sub: SubParsers) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the HTTP signing service (foreground, until SIGTERM)",
        description="Serve the configured deployment over HTTP (docs/service.md). "
        "SIGTERM: finish in-flight requests and stop; SIGHUP: reload the configuration.",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: [service] listen, else 127.0.0.1:8420)",
    )
    serve.set_defaults(func=cmd_serve)

    service = sub.add_parser("service", help="signing service clients")
    ss = service.add_subparsers(dest="service_cmd", required=True)
    add = ss.add_parser(
        "add-client",
        help="declare a client; prints its token once, as the last line",
    )
    add.add_argument("name", help="the client's name (A-Z a-z 0-9 . _ -), shown in audit entries")
    add.add_argument(
        "--keys",
        required=True,
        metavar="KEY[,KEY...]",
        help="key labels, ids or label patterns (fnmatch: hot-*) the client may use",
    )
    add.add_argument(
        "--ops",
        required=True,
        metavar="OP[,OP...]",
        help="read, sign-digest, sign-message, sign-psbt, admin",
    )
    add.add_argument(
        "--cert-sha256",
        metavar="HEX",
        help="bind the token to this client certificate (SHA-256 of its DER; needs mutual TLS)",
    )
    add.add_argument(
        "--rate-limit", type=float, metavar="PER_S", help="this client's requests per second"
    )
    add.set_defaults(func=cmd_add_client)
    ss.add_parser("list-clients", help="the declared clients (never their tokens)").set_defaults(
        func=cmd_list_clients
    )
