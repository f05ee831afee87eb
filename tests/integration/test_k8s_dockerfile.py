"""k8s/Dockerfile cannot be built here (no Docker engine): every file and entrypoint it names must exist and work.

The Dockerfile has stages: `build`, `runtime` (what every image shares), `service` (a gRPC service) and `graphql`
(the GraphQL API), and SERVICE picks the last one (`FROM image-${SERVICE}`). Each test follows the stages the
image of one SERVICE is made of, as Docker would.
"""

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
from tessera_deploy.catalog import SERVICE_CALLS
from tessera_runtime import app

DOCKERFILE = ROOT / "k8s" / "Dockerfile"
DOCKERIGNORE = ROOT / "k8s" / "Dockerfile.dockerignore"
SERVICES = sorted(app.SERVICES)
# Every image the Dockerfile builds: one per service, and the GraphQL API's.
IMAGES = [*SERVICES, "graphql"]


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


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name → (what it is FROM, its instructions)."""
    found: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] | None = None
    for instruction, rest in instructions():
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(found)}"
            current = []
            found[name] = (words[0], current)
        elif current is not None:
            current.append((instruction, rest))
    return found


def image_stages(service: str) -> list[str]:
    """The stages the image of SERVICE=service is made of, the first (FROM the base image) first."""
    all_stages = stages()
    final = list(all_stages)[-1]
    chain, name = [], all_stages[final][0].replace("${SERVICE}", service)
    chain.append(final)
    while name in all_stages:
        chain.append(name)
        name = all_stages[name][0]
    return chain[::-1]


def image_instructions(service: str) -> list[tuple[str, str]]:
    return [i for name in image_stages(service) for i in stages()[name][1]]


def copy_sources(service: str) -> list[tuple[str, str]]:
    """(source in the build context, destination) of every COPY from the context that the build stage and the image
    of one SERVICE make."""
    pairs = []
    for instruction, rest in [*stages()["build"][1], *image_instructions(service)]:
        if instruction != "COPY" or rest.startswith("--from"):
            continue
        *sources, destination = rest.replace("${SERVICE}", service).split()
        pairs.extend((source, destination) for source in sources)
    return pairs


def copies_from_build(service: str) -> list[tuple[str, str]]:
    """(path in the build stage, destination in the image) of every COPY --from=build of the image."""
    pairs = []
    for instruction, rest in image_instructions(service):
        if instruction == "COPY" and rest.startswith("--from=build"):
            source, destination = rest.split()[1:]
            pairs.append((source, destination))
    return pairs


def python_path(service: str) -> list[str]:
    """The image's PYTHONPATH (its last ENV that sets it)."""
    value = ""
    for instruction, rest in image_instructions(service):
        if instruction == "ENV":
            match = re.search(r"PYTHONPATH=(\S+)", rest)
            if match:
                value = match.group(1)
    return value.split(":")


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


@pytest.mark.parametrize("service", SERVICES)
def test_every_services_subscriptions_are_copied_into_every_service_image(service):
    copied = {source for source, _ in copy_sources(service)}
    subscriptions = {str(p.relative_to(ROOT)) for p in (ROOT / "services").glob("tessera_*/subscriptions.py")}
    assert subscriptions and subscriptions <= copied, f"not copied into every image: {subscriptions - copied}"


def test_each_service_picks_its_own_stage():
    """SERVICE=<service> builds the service stage, SERVICE=graphql the GraphQL API's, and the service stage refuses
    any other name: the list in its check is exactly the services."""
    for service in IMAGES:
        chain = image_stages(service)
        assert chain[0] == "runtime" and chain[-2] == f"image-{service}", chain
        assert chain[1] == ("graphql" if service == "graphql" else "service"), chain
    check = next(rest for instruction, rest in stages()["service"][1] if instruction == "RUN")
    assert sorted(re.search(r'case "\$\{SERVICE\}" in ([\w|]+)\)', check).group(1).split("|")) == SERVICES
    assert "graphql" not in {s for _, s in copy_sources("user")} and not any(
        "gateway-envoy" in source for source, _ in copy_sources("user")), "a service image carries the API's files"


@pytest.mark.parametrize("service", IMAGES)
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
    for service in SERVICES:
        assert dict(image_instructions(service))["ENTRYPOINT"] == '["python", "-m", "tessera_runtime.cli"]'
    assert (ROOT / "services" / "tessera_runtime" / "cli.py").is_file()
    assert dict(image_instructions("graphql"))["ENTRYPOINT"] == '["python", "-m", "tessera_graphql"]'
    assert (ROOT / "services" / "tessera_graphql" / "__main__.py").is_file()
    base = next(rest for instruction, rest in instructions() if instruction == "ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base), "the base image is pinned"
    for service in IMAGES:
        assert dict(image_instructions(service))["USER"] == "10001:10001", service


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


def _image_layout(service: str, app_root: Path, build: Path) -> None:
    """What the image of SERVICE holds under /app: its COPYs from the context and from the build stage."""
    pairs = [(ROOT / source, destination) for source, destination in copy_sources(service)]
    pairs += [(build / Path(source).relative_to("/src"), destination)
              for source, destination in copies_from_build(service) if source.startswith("/src/")]
    for source, destination in pairs:
        if not destination.startswith("/app/"):
            continue
        target = app_root / Path(destination).relative_to("/app")
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def test_the_image_layout_generates_code_and_imports_every_service(tmp_path):
    """The build stage's code generation and each image's imports, from only what the Dockerfile copies, on only the
    image's PYTHONPATH."""
    build = tmp_path / "src"
    for source, destination in copy_sources("user"):
        if destination.startswith("./"):  # build stage (WORKDIR /src)
            target = build / destination / (Path(source).name if destination.endswith("/") else "")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / source).is_dir() else shutil.copyfile)(ROOT / source, target)
    result = subprocess.run([sys.executable, "services/tessera_build/codegen.py"], cwd=build, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    repo_paths = [str(ROOT / "services"), str(ROOT / "gen"), str(ROOT / "gateway-envoy")]
    for service in IMAGES:
        app_root = tmp_path / f"app-{service}"
        _image_layout(service, app_root, build)
        paths = [str(app_root / Path(p).relative_to("/app")) for p in python_path(service)]
        assert paths and all(p.startswith(str(app_root)) for p in paths), python_path(service)
        # The repository's own folders leave sys.path, so only the image layout can satisfy the imports.
        prelude = (
            f"import sys; sys.path = [p for p in sys.path if p and not p.startswith(tuple({repo_paths!r}))];"
            f"sys.path[:0] = {paths!r};"
        )
        if service == "graphql":
            # What `python -m tessera_graphql` does before it serves: settings as the Deployment gives them, the
            # scopes from gateway.yaml and the descriptor set inside the image (the prod profile), the schema.
            calls = sorted(SERVICE_CALLS["graphql"])
            code = prelude + (
                "import tessera_graphql.app as app, tessera_gateway;"
                f"assert app.__file__.startswith({str(app_root)!r}), app.__file__;"
                f"assert str(tessera_gateway.DESCRIPTOR_SET).startswith({str(app_root)!r});"
                "s = app.GraphQLSettings.from_env({'TESSERA_ENV': 'production', 'TESSERA_GRAPHQL_HOST': '0.0.0.0'});"
                "assert s.gateway_profile == 'prod';"
                "from tessera_graphql.upstream import Scopes;"
                "scopes = Scopes.from_gateway(s.gateway_profile);"
                f"missing = set({calls!r}) - set(scopes.needed); assert not missing, missing;"
                "from tessera_graphql.schema import build_schema; build_schema()"
            )
        else:
            code = prelude + (
                "import importlib, tessera_runtime.cli as cli;"
                f"assert cli.__file__.startswith({str(app_root)!r}), cli.__file__;"
                f"root = importlib.import_module(cli.app.SERVICES[{service!r}]);"
                f"assert root.__file__.startswith({str(app_root)!r}), root.__file__;"
                f"cli.build_parser().parse_args(['serve', {service!r}]);"
                # Every image's relay knows every consumer queue, whichever service it runs.
                "from tessera_runtime.messaging.topology import installed_consumer_routes;"
                "routes = installed_consumer_routes();"
                f"assert sorted(routes) == {sorted(consumer_queues())!r}, routes"
            )
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{service}: {result.stderr}"
