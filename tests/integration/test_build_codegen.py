"""Code generation (`make gen`) is reproducible: two runs from the same contracts write byte-identical stubs and
descriptor set, whatever folder they run in, and the same as the repository's own gen/.

codegen.py writes next to itself (its ROOT is two folders above it), so each run is a copy of proto/ and the
script in a temporary tree of its own: the repository's gen/, which other tests import, is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT


def generate(tree: Path, hash_seed: str) -> tuple[dict[str, bytes], str]:
    """Runs codegen.py in a copy of the sources under `tree`; returns {path under gen/: bytes} and its digest."""
    shutil.copytree(ROOT / "proto", tree / "proto")
    shutil.copytree(ROOT / "services" / "tessera_build", tree / "services" / "tessera_build",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run([sys.executable, "services/tessera_build/codegen.py", "--print-digest"], cwd=tree,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    digest = result.stdout.split()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", digest), result.stdout
    return files_under(tree / "gen"), digest


def files_under(gen: Path) -> dict[str, bytes]:
    return {str(p.relative_to(gen)): p.read_bytes() for p in sorted(gen.rglob("*"))
            if p.is_file() and p.name != ".stamp" and "__pycache__" not in p.parts}


def test_two_runs_generate_byte_identical_stubs_and_descriptor_set(tmp_path):
    # Different folders (of different lengths) and hash seeds: nothing of either may leak into the output.
    first, first_digest = generate(tmp_path / "a", "1")
    second, second_digest = generate(tmp_path / "second-run-elsewhere", "2")

    assert "descriptors/tessera.pb" in first
    assert any(name.endswith("_pb2.py") for name in first) and any(name.endswith("_pb2_grpc.py") for name in first)
    assert any(name.endswith(".pyi") for name in first)
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []
    assert first_digest == second_digest
    for content in first.values():
        assert str(tmp_path).encode() not in content  # no absolute path of the run


def test_the_repositorys_gen_is_what_a_fresh_run_generates(tmp_path):
    fresh, _ = generate(tmp_path / "fresh", "0")
    existing = files_under(ROOT / "gen")
    assert sorted(existing) == sorted(fresh), "gen/ is stale: run make gen"
    assert [name for name in fresh if fresh[name] != existing[name]] == [], "gen/ is stale: run make gen"
