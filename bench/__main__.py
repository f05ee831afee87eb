"""`python -m bench`: run the scenarios, alternating each baseline and subject, and write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from bench import infra, report
from bench.harness import Config, Run, ScenarioResult, git_revision
from bench.procs import ROOT
from bench.scenarios import SCENARIOS
from bench.scenarios.memory import idle_memory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated scenario numbers (default: all of {','.join(SCENARIOS)})")
    parser.add_argument("--seconds", type=float, default=Config.seconds, help="measured seconds per segment")
    parser.add_argument("--warmup", type=float, default=Config.warmup, help="warm-up seconds per segment")
    parser.add_argument("--requests", type=int, default=0,
                        help="send this many requests per segment instead of running for --seconds (smoke runs)")
    parser.add_argument("--rounds", type=int, default=Config.rounds, help="rounds of baseline-then-subject")
    parser.add_argument("--services", default=",".join(Config.services),
                        help="services whose idle memory is measured (those that exist in this checkout)")
    parser.add_argument("--no-memory", action="store_true", help="skip the idle memory measurement")
    parser.add_argument("--no-profile", action="store_true", help="do not py-spy subjects that miss their target")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench",
                        help="logs of every process started and raw profiles")
    parser.add_argument("--refresh-analysis", action="store_true",
                        help="measure nothing: rewrite the Analysis section of --output from bench/FINDINGS.md")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios.split(",") if n and n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.refresh_analysis:
        report.refresh_analysis(args.output)
        print(f"bench: refreshed the analysis in {args.output}")
        return 0
    missing = infra.ensure_tools()
    if missing:
        print(f"bench: {', '.join(missing)} missing and could not be installed", file=sys.stderr)
        return 2
    config = Config(seconds=args.seconds, warmup=args.warmup, requests=args.requests, rounds=args.rounds,
                    profile=not args.no_profile, services=tuple(s for s in args.services.split(",") if s))
    started = time.monotonic()
    env = infra.environment()
    run = Run(config, args.workdir)
    results: list[ScenarioResult] = []
    notes: list[str] = []
    try:
        if not args.no_memory:
            print("bench: idle memory of each service", flush=True)
            notes += idle_memory(run)
        for number in [n for n in args.scenarios.split(",") if n]:
            scenario = SCENARIOS[number]
            print(f"bench: scenario {number}", flush=True)
            try:
                result = scenario(run)
            except Exception as exc:  # one broken scenario must not hide the others' numbers
                traceback.print_exc()
                result = ScenarioResult(number, scenario.__name__.replace("_", " "), "", "",
                                        skipped=f"it failed: {type(exc).__name__}: {str(exc)[:300]}")
            results.append(result)
            if not result.skipped:
                print(f"bench:   {result.subject_value:,.0f} vs {result.baseline_value:,.0f} {result.unit} "
                      f"= {result.ratio:.2f}× (target {result.target_text})", flush=True)
    finally:
        run.close()
    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    memory = sorted(run.memory.values(), key=lambda row: row.service)
    report.write(args.output, results, memory, env, config, git_revision(), time.monotonic() - started, notes)
    if args.json:
        report.write_json(args.json, results, memory, env, config,
                          {"databases": list(run.dbs.created), "vhosts": list(run.vhosts)})
    print(f"bench: wrote {args.output} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
