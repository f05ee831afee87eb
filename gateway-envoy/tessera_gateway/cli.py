"""`tessera token mint`: development tokens the dev gateway accepts (issuer, audience and key of the dev profile)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tessera_gateway import description as description_module
from tessera_gateway import tokens
from tessera_runtime.db import first_line


def _mint(args: argparse.Namespace) -> int:
    try:
        d = description_module.load(args.profile)
        ttl = tokens.parse_ttl(args.ttl)
    except (description_module.DescriptionError, ValueError) as exc:
        print(f"tessera token: {exc}", file=sys.stderr)
        return 2
    if d.jwt.jwks_file is None:
        print(f"tessera token: profile {args.profile} verifies tokens with a remote JWKS; mint them with its "
              "identity provider", file=sys.stderr)
        return 2
    if not args.sub.strip():
        print("tessera token: --sub must name the user the token acts for; the gateway refuses a token without a "
              "subject", file=sys.stderr)
        return 2
    if ttl > d.jwt.max_lifetime_seconds:
        print(f"tessera token: --ttl {args.ttl} is longer than the {args.profile} gateway accepts "
              f"(jwt.max_lifetime_seconds: {d.jwt.max_lifetime_seconds} s)", file=sys.stderr)
        return 2
    scopes = args.scope.split()
    unknown = [s for s in scopes if s not in d.scopes]
    if unknown:
        print(f"tessera token: unknown scope {unknown[0]!r}; known: {' '.join(d.scopes)}", file=sys.stderr)
        return 2
    folder = args.keys or d.jwt.jwks_file.parent
    try:
        key = tokens.ensure_keys(folder)
    except OSError as exc:
        print(f"tessera token: cannot use the key folder {folder}: {first_line(exc)}", file=sys.stderr)
        return 2
    print(tokens.mint(key, subject=args.sub, scopes=scopes, issuer=d.jwt.issuer, audience=d.jwt.audiences[0],
                      ttl_seconds=ttl))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser("token", help="development JWTs for the gateway")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    mint = token_sub.add_parser("mint", help="print an RS256 token signed with the dev key (made on first use)")
    mint.add_argument("--sub", required=True, help="subject: the user id the token acts for")
    mint.add_argument("--scope", default="", help='space-delimited scopes, e.g. "user:read order:write"')
    mint.add_argument("--ttl", default="1h",
                      help="lifetime: seconds or 30m, 12h, 1d (default 1h; at most the profile's "
                           "jwt.max_lifetime_seconds, 1d)")
    mint.add_argument("--profile", default="dev", choices=description_module.PROFILES)
    mint.add_argument("--keys", type=Path, default=None,
                      help="folder of the signing key and JWKS (default: the folder of the profile's jwks_file)")
    mint.set_defaults(func=_mint)
