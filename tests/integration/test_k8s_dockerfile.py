"""k8s/Dockerfile cannot be built here (no Docker engine): every file and entrypoint it names must exist and work."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tessera_deploy import ROOT
from tessera_runtime import app

DOCKERFILE = ROOT / "k8s" / "Dockerfile"
DOCKERIGNORE = ROOT / "k8s" / "Dockerfile.dockerignore"
SERVICES = sorted(app.SERVICES)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current:
                instruction, _, rest = current.partition(" ")
                lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def copy_sources(service: str) -> list[tuple[str, str]]:
    """(source in the build context, destination) of every COPY from the context, for one SERVICE."""
    pairs = []
    for instruction, rest in instructions():
        if instruction != "COPY" or rest.startswith("--from"):
            continue
        *sources, destination = rest.replace("${SERVICE}", service).split()
        pairs.extend((source, destination) for source in sources)
    return pairs


def in_context(path: str) -> bool:
    """Whether .dockerignore keeps the path in the build context (last matching pattern wins)."""
    keep = True
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(path, pattern):
            keep = negated
    return keep


def consumer_queues() -> set[str]:
    """The consumer queues of every service in the repository (its `subscriptions` module's ROUTES)."""
    from tessera_runtime.messaging.topology import installed_consumer_routes

    return set(installed_consumer_routes())


def test_every_services_subscriptions_are_copied_into_every_image():
    copied = {source for source, _ in copy_sources("user")}
    subscriptions = {str(p.relative_to(ROOT)) for p in (ROOT / "services").glob("tessera_*/subscriptions.py")}
    assert subscriptions and subscriptions <= copied, f"not copied into every image: {subscriptions - copied}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_copied_file_exists_and_is_in_the_build_context(service):
    sources = copy_sources(service)
    assert f"services/tessera_{service}" in [s for s, _ in sources]
    for source, _ in sources:
        assert (ROOT / source).exists(), f"k8s/Dockerfile copies {source}, which does not exist"
        assert in_context(source), f"k8s/Dockerfile.dockerignore leaves {source} out of the build context"
    assert not in_context(".venv/bin/python") and not in_context("gen/python") and not in_context("data/user.db")


def test_run_steps_name_existing_scripts_and_the_entrypoint_exists():
    runs = " ".join(rest for instruction, rest in instructions() if instruction == "RUN")
    for script in [token for token in runs.split() if token.endswith(".py")]:
        copied = {dst: src for src, dst in copy_sources("user")}
        source = copied.get(script) or script
        assert (ROOT / source).is_file(), f"a RUN step runs {script}, which does not exist"
    entrypoint = dict(instructions())["ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "tessera_runtime.cli"]'
    assert (ROOT / "services" / "tessera_runtime" / "cli.py").is_file()
    base = next(rest for instruction, rest in instructions() if instruction == "ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base), "the base image is pinned"
    assert dict(instructions())["USER"] == "10001:10001"


def test_requirements_split_gives_the_runtime_only_runtime_dependencies(tmp_path):
    runtime, codegen = tmp_path / "runtime.txt", tmp_path / "codegen.txt"
    result = subprocess.run([sys.executable, str(ROOT / "k8s/docker/requirements.py"), str(ROOT / "pyproject.toml"),
                             str(runtime), str(codegen)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert runtime.read_text().split() == project["dependencies"]
    assert not any(line.startswith(("grpcio-tools", "pytest", "ruff")) for line in runtime.read_text().split())
    names = [line.split("==")[0] for line in codegen.read_text().split()]
    assert names == ["grpcio-tools", "protobuf", "googleapis-common-protos"]
    assert all("==" in line for line in codegen.read_text().split())


def test_the_image_layout_generates_code_and_imports_every_service(tmp_path):
    """The build stage's code generation and the runtime stage's imports, from only what the Dockerfile copies."""
    build = tmp_path / "src"
    for source, destination in copy_sources("user"):
        if destination.startswith("./"):  # build stage (WORKDIR /src)
            target = build / destination / (Path(source).name if destination.endswith("/") else "")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / source).is_dir() else shutil.copyfile)(ROOT / source, target)
    result = subprocess.run([sys.executable, "services/tessera_build/codegen.py"], cwd=build, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    gen = build / "gen" / "python"
    repo_paths = [str(ROOT / "services"), str(ROOT / "gen"), str(ROOT / "gateway-envoy")]
    for service in SERVICES:
        # One image per service: the shared runtime and that service's package, nothing else.
        app_services = tmp_path / f"app-{service}" / "services"
        for source, destination in copy_sources(service):
            if destination.startswith("/app/services/"):
                target = app_services / Path(destination).relative_to("/app/services")
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"),
                                    dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ROOT / source, target)
        # The repository's own folders leave sys.path, so only the image layout can satisfy the imports.
        code = (
            f"import sys; sys.path = [p for p in sys.path if p and not p.startswith(tuple({repo_paths!r}))];"
            f"sys.path[:0] = [{str(app_services)!r}, {str(gen)!r}];"
            "import importlib, tessera_runtime.cli as cli;"
            f"assert cli.__file__.startswith({str(app_services)!r}), cli.__file__;"
            f"root = importlib.import_module(cli.app.SERVICES[{service!r}]);"
            f"assert root.__file__.startswith({str(app_services)!r}), root.__file__;"
            f"cli.build_parser().parse_args(['serve', {service!r}]);"
            # Every image's relay knows every consumer queue, whichever service it runs.
            "from tessera_runtime.messaging.topology import installed_consumer_routes;"
            "routes = installed_consumer_routes();"
            f"assert sorted(routes) == {sorted(consumer_queues())!r}, routes"
        )
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{service}: {result.stderr}"
