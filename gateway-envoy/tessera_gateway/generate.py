"""Writes the Envoy bootstrap of the edge gateway for one profile of gateway.yaml.

Usage: python -m tessera_gateway.generate --profile dev|prod --out FILE [--format yaml|json]
           [--upstream NAME=HOST:PORT ...] [--listen HOST:PORT] [--admin HOST:PORT] [--values FILE]

Overrides replace the profile's values (the structure never changes): --upstream points a service at another
address, --listen/--admin move the listeners (port 0 picks a free one), --values merges a YAML file of values.
The dev profile's signing key and JWKS are made on first use when the JWKS file does not exist yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tessera_gateway import BUILD_DIR, DESCRIPTION, DESCRIPTOR_SET, openapi, tokens
from tessera_gateway import description as description_module
from tessera_gateway.bootstrap import GatewayConfig, render
from tessera_gateway.description import Description, DescriptionError
from tessera_gateway.descriptors import ContractError, Contracts


@dataclasses.dataclass(frozen=True)
class Generated:
    description: Description
    config: GatewayConfig
    openapi: dict[str, Any]


def generate(profile: str, overrides: Mapping[str, Any] | None = None, *, descriptor_set: Path = DESCRIPTOR_SET,
             description_path: Path = DESCRIPTION) -> Generated:
    """Builds the bootstrap (and the OpenAPI document it serves) for a profile with value overrides."""
    description = description_module.load(profile, description_path, overrides)
    contracts = Contracts.load(descriptor_set)
    if description.jwt.jwks_file is not None and not description.jwt.jwks_file.exists():
        tokens.ensure_keys(description.jwt.jwks_file.parent)
    document = openapi.build(contracts, description)
    config = GatewayConfig(description, contracts, json.dumps(document, separators=(",", ":")))
    return Generated(description=description, config=config, openapi=document)


def write(generated: Generated, out: Path, fmt: str = "yaml") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(generated.config.bootstrap(), fmt))
    return out


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.values:
        try:
            loaded = yaml.safe_load(Path(args.values).read_text()) or {}
        except OSError as exc:
            raise DescriptionError(f"--values {args.values}: cannot be read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise DescriptionError(f"--values {args.values}: is not YAML: "
                                   f"{description_module.yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise DescriptionError(f"{args.values} must hold a mapping of values")
        values = description_module.deep_merge(values, loaded)
    for item in args.upstream or ():
        name, sep, address = item.partition("=")
        if not sep:
            raise DescriptionError(f"--upstream must be NAME=HOST:PORT, got {item!r}")
        values = description_module.deep_merge(values, {"upstreams": {"addresses": {name: address}}})
    for key in ("listen", "admin"):
        text = getattr(args, key)
        if text:
            address = description_module.Address.parse(text, f"--{key}")
            target = "listener" if key == "listen" else "admin"
            values = description_module.deep_merge(values, {target: {"address": address.host,
                                                                     "port": address.port}})
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera_gateway.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=description_module.PROFILES, default="dev")
    parser.add_argument("--out", type=Path, default=None, help="default: build/gateway/envoy-<profile>.yaml")
    parser.add_argument("--format", choices=("yaml", "json"), default=None,
                        help="default: from the file name (.json or else yaml)")
    parser.add_argument("--upstream", action="append", metavar="NAME=HOST:PORT")
    parser.add_argument("--listen", metavar="HOST:PORT")
    parser.add_argument("--admin", metavar="HOST:PORT")
    parser.add_argument("--values", metavar="FILE", help="YAML mapping of values merged over the profile")
    parser.add_argument("--descriptors", type=Path, default=DESCRIPTOR_SET)
    args = parser.parse_args(argv)
    out = args.out or BUILD_DIR / f"envoy-{args.profile}.yaml"
    fmt = args.format or ("json" if out.suffix == ".json" else "yaml")
    try:
        generated = generate(args.profile, overrides_from_args(args), descriptor_set=args.descriptors)
    except (DescriptionError, ContractError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        write(generated, out, fmt)
    except OSError as exc:
        print(f"gateway: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    contracts = generated.config.contracts
    print(f"gateway: {args.profile} profile, {len(contracts.services)} services, {len(contracts.rpcs)} RPCs -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
