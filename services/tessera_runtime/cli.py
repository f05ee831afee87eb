"""The `tessera` command: serve and migrate services; other parts of Tessera add their own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from tessera_runtime import app
from tessera_runtime.config import ConfigError

# Modules that add subcommands: each exposes `register(subparsers)`; missing ones are skipped so that a
# partial installation still has a working CLI.
EXTENSIONS = (
    "tessera_runtime.messaging.cli",
    "tessera_runtime.discovery.cli",
    "tessera_gateway.cli",
    "tessera_deploy.cli",
)


def _serve(args: argparse.Namespace) -> int:
    return app.run(args.service)


def _migrate(args: argparse.Namespace) -> int:
    from tessera_runtime.db import cannot_connect, first_line
    from tessera_runtime.migrations import upgrade

    root = app.composition_root(args.service)
    try:
        settings = app.load_settings(root)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    where = settings.database_url.split('@')[-1]
    try:
        upgrade(root.MIGRATIONS, settings.database_url)
    except Exception as exc:
        if not cannot_connect(exc):
            raise  # a migration that fails on a database it reached: its traceback is what helps
        print(f"{args.service}: cannot use the database at {where}: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"{args.service}: migrations applied to {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera command line")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service until SIGTERM")
    serve.add_argument("service", choices=sorted(app.SERVICES))
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply a service's database migrations")
    migrate.add_argument("service", choices=sorted(app.SERVICES))
    migrate.set_defaults(func=_migrate)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
