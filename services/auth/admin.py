"""``python -m services.auth.admin``: administer the auth service from a shell on its host (or
``kubectl exec``), with the same settings (``AUTH_*``) and database as the service; it works
whether the service runs or not, and the running service sees every change at once (principals,
revocations) or within a second (a rotated key).

Secrets are never taken as arguments (they would show in ``ps`` and shell history): they are
read from a prompt or from stdin (``--stdin``), or generated and printed once.

Examples::

    python -m services.auth.admin create-user alice --scope search:text --scope items:read
    python -m services.auth.admin create-client indexer --scope items:write
    python -m services.auth.admin list
    python -m services.auth.admin set-scopes alice search:text search:image
    python -m services.auth.admin disable alice
    python -m services.auth.admin revoke-tokens alice
    python -m services.auth.admin revoke-jti 0b6f…
    python -m services.auth.admin rotate-key
    python -m services.auth.admin keys
"""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from services.auth.keys import SigningKeyError
from services.auth.principals import PrincipalKind, PrincipalRecord
from services.auth.scopes import KNOWN_SCOPES, format_scopes
from services.auth.service import AuthService
from services.auth.settings import MAX_SECRET_LENGTH, AuthSettings
from shared.problems import ProblemError


def _principal(record: PrincipalRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "kind": record.kind.value,
        "scopes": format_scopes(record.scopes).split(),
        "disabled": record.disabled,
        "created_at": record.created_at.isoformat(),
    }


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _read_secret(args: argparse.Namespace, what: str) -> str | None:
    """The secret from stdin or a prompt; None to have one generated."""
    if getattr(args, "generate", False):
        return None
    if args.stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        secret = getpass.getpass(f"{what}: ")
        if getpass.getpass(f"{what} (again): ") != secret:
            raise SystemExit("error: the two entries differ")
    else:
        raise SystemExit(f"error: no terminal to ask for the {what}; use --stdin or --generate")
    if not secret or len(secret) > MAX_SECRET_LENGTH:
        raise SystemExit(f"error: the {what} must be 1 to {MAX_SECRET_LENGTH} characters")
    return secret


class Commands:
    def __init__(self, service: AuthService, *, as_json: bool, actor: str) -> None:
        self.service = service
        self.as_json = as_json
        self.actor = actor

    def _out(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2) if self.as_json else text)

    def list_principals(self, args: argparse.Namespace) -> None:
        records = self.service.list_principals()
        rows = [
            f"{r.name:<24} {r.kind.value:<7} {'disabled' if r.disabled else 'enabled ':<8} "
            f"{format_scopes(r.scopes) or '-'}"
            for r in records
        ]
        self._out([_principal(r) for r in records], "\n".join(rows) or "(no principals)")

    def create(self, args: argparse.Namespace, kind: PrincipalKind) -> None:
        secret = _read_secret(args, "password" if kind is PrincipalKind.USER else "secret")
        record, generated = self.service.create_principal(
            args.name, kind, secret, args.scope, actor=self.actor
        )
        text = f"created {kind.value} {record.name} ({format_scopes(record.scopes) or 'no scopes'})"
        if generated:
            text += f"\nsecret (shown once): {generated}"
        self._out({"principal": _principal(record), "secret": generated}, text)

    def update(self, args: argparse.Namespace, **changes: Any) -> None:
        record = self.service.update_principal(args.name, actor=self.actor, **changes)
        self._out(_principal(record), f"{record.name}: updated")

    def set_secret(self, args: argparse.Namespace) -> None:
        secret = _read_secret(args, "new secret")
        generated = None
        if secret is None:
            secret = generated = secrets.token_urlsafe(24)
        record = self.service.update_principal(args.name, secret=secret, actor=self.actor)
        text = f"{record.name}: new secret set; its tokens are revoked"
        if generated:
            text += f"\nsecret (shown once): {generated}"
        self._out({"principal": _principal(record), "secret": generated}, text)

    def revoke_tokens(self, args: argparse.Namespace) -> None:
        revocation = self.service.revoke_principal_tokens(args.name, actor=self.actor)
        self._out(
            revocation.as_entry(),
            f"every token of {args.name} issued before {_when(revocation.not_before)} is revoked",
        )

    def revoke_jti(self, args: argparse.Namespace) -> None:
        revocation = self.service.revoke_token_id(args.jti, args.expires_at, actor=self.actor)
        self._out(revocation.as_entry(), f"token {args.jti} is revoked")

    def keys(self, args: argparse.Namespace) -> None:
        keys = self.service.describe_keys()
        rows = [
            f"{k.kid}  {'signing  ' if k.signing else ('published' if k.published else 'withdrawn')}"
            f"  created {_when(k.created_at)}  retired {_when(k.retired_at)}"
            for k in keys
        ]
        self._out([asdict(k) for k in keys], "\n".join(rows))

    def rotate_key(self, args: argparse.Namespace) -> None:
        rotation = self.service.rotate_key(actor=self.actor)
        self._out(
            asdict(rotation),
            f"new signing key {rotation.kid}; {rotation.previous_kid} stays published until "
            f"{_when(rotation.previous_published_until)}",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.auth.admin",
        description="Administer principals, revocations and signing keys of the auth service.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    sub.add_parser("list", help="list users and clients")
    for kind in ("user", "client"):
        create = sub.add_parser(f"create-{kind}", help=f"create a {kind}")
        create.add_argument("name")
        create.add_argument(
            "--scope",
            action="append",
            default=[],
            choices=KNOWN_SCOPES,
            help="a scope to grant (repeat for several)",
        )
        _secret_options(create, generate_default=kind == "client")
    for name, help_text in (("disable", "disable (and revoke every token)"), ("enable", "enable")):
        sub.add_parser(name, help=help_text).add_argument("name")
    scopes = sub.add_parser("set-scopes", help="replace the scopes (none given: no scopes)")
    scopes.add_argument("name")
    scopes.add_argument("scopes", nargs="*", metavar="scope", help=" ".join(KNOWN_SCOPES))
    secret = sub.add_parser("set-secret", help="set a new password or client secret")
    secret.add_argument("name")
    _secret_options(secret, generate_default=False)
    sub.add_parser("revoke-tokens", help="revoke every token of a principal").add_argument("name")
    jti = sub.add_parser("revoke-jti", help="revoke one access token by its jti")
    jti.add_argument("jti")
    jti.add_argument("--expires-at", type=float, help="the token's exp, when known")
    sub.add_parser("keys", help="list the signing keys")
    sub.add_parser("rotate-key", help="sign with a new key (the old one stays published)")
    return parser


def _secret_options(parser: argparse.ArgumentParser, *, generate_default: bool) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stdin", action="store_true", help="read the secret from stdin")
    group.add_argument(
        "--generate",
        action="store_true",
        default=generate_default,
        help="generate a secret and print it once"
        + (" (the default for clients)" if generate_default else ""),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "stdin", False):
        args.generate = False
    try:
        settings = AuthSettings()
    except ValidationError as exc:
        print(f"error: invalid AUTH_* settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        service = AuthService.open(settings, bootstrap=False)
    except SigningKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    commands = Commands(service, as_json=args.json, actor=f"cli:{getpass.getuser()}")
    dispatch: dict[str, Callable[[argparse.Namespace], None]] = {
        "list": commands.list_principals,
        "create-user": lambda a: commands.create(a, PrincipalKind.USER),
        "create-client": lambda a: commands.create(a, PrincipalKind.CLIENT),
        "disable": lambda a: commands.update(a, disabled=True),
        "enable": lambda a: commands.update(a, disabled=False),
        "set-scopes": lambda a: commands.update(a, scopes=a.scopes),
        "set-secret": commands.set_secret,
        "revoke-tokens": commands.revoke_tokens,
        "revoke-jti": commands.revoke_jti,
        "keys": commands.keys,
        "rotate-key": commands.rotate_key,
    }
    try:
        dispatch[args.command](args)
    except ProblemError as exc:
        print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
