"""`tessera traffic`: shift, promote or roll back a canary; prints the VirtualService to apply."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tessera_deploy import ROOT, traffic
from tessera_deploy.catalog import CANARIES

APPLY_HINT = "apply it with: kubectl apply -f -   (or istioctl; the YAML is on standard output)"


def _report(result: traffic.Shift, wrote: bool, root: Path) -> int:
    sys.stdout.write(result.manifest)
    where = result.path.relative_to(root) if result.path.is_relative_to(root) else result.path
    action = "wrote" if wrote else "would write"
    print(f"{result.service}: v2 {result.before}% -> {result.after}% (v1 {100 - result.after}%); {action} {where}",
          file=sys.stderr)
    print(APPLY_HINT, file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    write = not args.dry_run
    root = args.root.resolve()
    try:
        if args.action == "status":
            current = traffic.weight(args.service, root)
            print(f"{args.service}: v1 {100 - current}%, v2 {current}%")
            return 0
        if args.action == "shift":
            result = traffic.shift(args.service, args.canary, write=write, root=root)
        elif args.action == "promote":
            result = traffic.promote(args.service, write=write, root=root)
        else:
            result = traffic.rollback(args.service, write=write, root=root)
    except (traffic.TrafficError, FileNotFoundError) as exc:
        print(f"tessera traffic: {exc}", file=sys.stderr)
        return 2
    return _report(result, write, root)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "traffic", help="shift traffic between a service's v1 and its canary v2 (Istio weights)",
        description="Rewrites the canary VirtualService in k8s/components/canary-<service>-v2/ and prints it. "
                    f"Every service has one: {', '.join(f'{name}-service' for name in CANARIES)}.")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the Tessera checkout whose manifests to change (default: this one)")
    actions = parser.add_subparsers(dest="action", required=True)
    shift = actions.add_parser("shift", help="send a percentage of the traffic to v2")
    shift.add_argument("service", help="e.g. user-service")
    shift.add_argument("--canary", type=int, required=True, metavar="PERCENT", help="share for v2, 0-100")
    for name, text in (("promote", "send all traffic to v2"), ("rollback", "send all traffic back to v1"),
                       ("status", "print the current weights")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("service", help="e.g. user-service")
    for sub in (shift, actions.choices["promote"], actions.choices["rollback"]):
        sub.add_argument("--dry-run", action="store_true", help="print the YAML without changing the file")
    actions.choices["status"].set_defaults(dry_run=True)
    parser.set_defaults(func=_run)
