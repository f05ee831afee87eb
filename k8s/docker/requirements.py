"""Splits pyproject.toml's pinned dependencies into what an image runs and what its build generates code with."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

# The build stage runs services/tessera_build/codegen.py with these; the runtime image never has them.
CODEGEN = ("grpcio-tools", "protobuf", "googleapis-common-protos")


def split(pyproject: Path) -> tuple[list[str], list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = list(project["dependencies"])
    pinned = {req.split("==")[0].split("[")[0].lower(): req
              for req in runtime + project["optional-dependencies"]["dev"]}
    missing = [name for name in CODEGEN if name not in pinned]
    if missing:
        raise SystemExit(f"{pyproject}: no pinned {', '.join(missing)} for code generation")
    return runtime, [pinned[name] for name in CODEGEN]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: requirements.py PYPROJECT RUNTIME_OUT CODEGEN_OUT", file=sys.stderr)
        return 2
    runtime, codegen = split(Path(argv[0]))
    Path(argv[1]).write_text("\n".join(runtime) + "\n")
    Path(argv[2]).write_text("\n".join(codegen) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
