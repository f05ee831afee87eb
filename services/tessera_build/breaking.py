"""Runs `buf breaking` on proto/ against main's history, offline.

Against what: on a branch or with uncommitted changes, main's tip; on a clean main, the previous commit — so
every commit that lands on main is checked against the one before it. The baseline is materialised with
`git archive` and built with the same third-party protos, because buf cannot fetch imports from a registry here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def has_proto(ref: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{ref}:proto"], cwd=ROOT, capture_output=True).returncode == 0


def baseline_ref() -> str | None:
    try:
        git("rev-parse", "--verify", "main")
    except subprocess.CalledProcessError:
        return None
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "proto"))
    if branch != "main" or dirty:
        return "main"
    try:
        git("rev-parse", "--verify", "HEAD~1")
    except subprocess.CalledProcessError:
        return None
    return "HEAD~1"


def main() -> int:
    ref = baseline_ref()
    if ref is None or not has_proto(ref):
        print(f"buf breaking: no earlier contracts to compare with ({ref or 'no history'}); nothing to check")
        return 0
    with tempfile.TemporaryDirectory(prefix="tessera-breaking-") as tmp:
        base = Path(tmp)
        archive = subprocess.run(["git", "archive", ref, "proto"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        shutil.copyfile(ROOT / "buf.yaml", base / "buf.yaml")
        shutil.copytree(ROOT / "build" / "third_party", base / "build" / "third_party")
        image = base / "baseline.binpb"
        subprocess.run([str(BUF), "build", str(base), "-o", str(image)], check=True)
        current = base / "current.binpb"
        subprocess.run([str(BUF), "build", str(ROOT), "-o", str(current)], check=True)
        # Images compare file by file; the third-party files are identical on both sides by construction.
        result = subprocess.run([str(BUF), "breaking", str(current), "--against", str(image),
                                 "--config", str(ROOT / "buf.yaml")], cwd=ROOT)
        if result.returncode == 0:
            print(f"buf breaking: proto/ is compatible with {ref} ({git('rev-parse', '--short', ref)})")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
