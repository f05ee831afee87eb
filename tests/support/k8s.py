"""Helpers for the manifest tests: rendered overlays cached per test run, copies of the manifests to break, and
the gRPC methods a service's code calls (read from its source) for the authorization tests."""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml

from tessera_deploy import ROOT, gateway_config, render
from tessera_deploy.checks import Problem
from tessera_deploy.validate import OverlayReport, validate_overlay
from tessera_runtime.devstack import PORTS

# Every service has a canary overlay: prod plus that service's v2 component.
SERVICES = tuple(PORTS)
CANARY_OVERLAYS = tuple(f"canary-{name}" for name in SERVICES)
OVERLAYS = ("dev", "prod", *CANARY_OVERLAYS, "chaos")


def canary_overlay(service: str) -> str:
    """The overlay that runs a service's v2 beside v1 (service: user or user-service)."""
    return f"canary-{service.removesuffix('-service')}"


@cache
def gateway_files() -> tuple[tuple[str, str], ...]:
    """The generator's prod output, written where kustomize reads it (once per test run)."""
    files = gateway_config.expected()
    gateway_config.write(files)
    return tuple(sorted(files.items()))


@cache
def report(overlay: str) -> OverlayReport:
    """The validation report of one committed overlay, computed once per test run."""
    return validate_overlay(ROOT / "k8s" / "overlays" / overlay, gateway_files=dict(gateway_files()))


def manifests(overlay: str) -> list[render.Manifest]:
    result = report(overlay)
    assert result.manifests, f"{overlay} did not render: {result.problems}"
    return result.manifests


def find(overlay: str, kind: str, name: str) -> dict:
    for m in manifests(overlay):
        if m.kind == kind and m.name == name:
            return m.obj
    raise AssertionError(f"{overlay} has no {kind}/{name}")


def copy_tree(tmp: Path) -> Path:
    """A copy of everything the overlays render from, for tests that break it; returns the copy's root."""
    gateway_files()
    for folder in ("k8s", "istio"):
        shutil.copytree(ROOT / folder, tmp / folder, ignore=shutil.ignore_patterns(".render-*", "__pycache__"))
    return tmp


def edit_yaml(path: Path, kind: str, name: str, change) -> None:
    """Applies change(doc) to the document kind/name of a multi-document YAML file, keeping the others."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    hits = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(hits) == 1, f"{path} has {len(hits)} {kind}/{name}"
    change(hits[0])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def validate_copy(root: Path, overlay: str) -> list[Problem]:
    return validate_overlay(root / "k8s" / "overlays" / overlay, root=root,
                            gateway_files=dict(gateway_files())).problems


def describe(problems: list[Problem]) -> str:
    return "\n".join(str(p) for p in problems) or "(no problems)"


class StubUseError(Exception):
    """A gRPC stub is used in a way that hides which methods it calls."""


def _stub_constructors(tree: ast.Module) -> tuple[dict[str, str], dict[str, str]]:
    """What the imports make available: module alias → package of a *_pb2_grpc module, and stub class name →
    its service's full name (`from tessera.user.v1.user_service_pb2_grpc import UserServiceStub`)."""
    modules: dict[str, str] = {}
    classes: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name.endswith("_pb2_grpc"):
                    modules[local] = node.module
                elif node.module.endswith("_pb2_grpc") and alias.name.endswith("Stub"):
                    package = node.module.rsplit(".", 1)[0]
                    classes[local] = f"{package}.{alias.name.removesuffix('Stub')}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.endswith("_pb2_grpc") and alias.asname:
                    modules[alias.asname] = alias.name.rsplit(".", 1)[0]
    return modules, classes


def _stub_service(call: ast.Call, modules: dict[str, str], classes: dict[str, str]) -> str | None:
    func = call.func
    if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules
            and func.attr.endswith("Stub")):
        return f"{modules[func.value.id]}.{func.attr.removesuffix('Stub')}"
    if isinstance(func, ast.Name) and func.id in classes:
        return classes[func.id]
    return None


def _enclosing(node: ast.AST, kinds: tuple[type, ...]) -> ast.AST | None:
    node = getattr(node, "parent", None)
    while node is not None and not isinstance(node, kinds):
        node = getattr(node, "parent", None)
    return node


def stub_calls(source: str, filename: str = "<source>") -> set[str]:
    """The gRPC paths (/package.Service/Method) that code calls through generated stubs.

    A stub is built by `<module>.<Service>Stub(channel)` (or the imported class) and kept in `self.<name>` or a
    local name; each `stub.<Method>` is a call of that method. Any other use of a stub (passed on, `getattr`,
    stored elsewhere) would hide what it calls, so it raises StubUseError rather than be missed."""
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    modules, classes = _stub_constructors(tree)
    called: set[str] = set()
    for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
        service = _stub_service(call, modules, classes)
        if service is None:
            continue
        parent = call.parent  # type: ignore[attr-defined]
        where = f"{filename}:{call.lineno}"
        if isinstance(parent, ast.Attribute):  # XStub(channel).Method(...)
            called.add(f"/{service}/{parent.attr}")
            continue
        if not (isinstance(parent, ast.Assign) and len(parent.targets) == 1):
            raise StubUseError(f"{where}: a {service} stub that is not assigned to one name")
        target = parent.targets[0]
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            scope = _enclosing(call, (ast.ClassDef,))

            def refers(n: ast.AST, attr: str = target.attr) -> bool:
                return (isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.value, ast.Name)
                        and n.value.id == "self")
        elif isinstance(target, ast.Name):
            scope = _enclosing(call, (ast.FunctionDef, ast.AsyncFunctionDef)) or tree

            def refers(n: ast.AST, name: str = target.id) -> bool:
                return isinstance(n, ast.Name) and n.id == name
        else:
            raise StubUseError(f"{where}: a {service} stub stored where its uses cannot be followed")
        if scope is None:
            raise StubUseError(f"{where}: a {service} stub on self outside a class")
        for use in ast.walk(scope):
            if not refers(use) or use is target:
                continue
            holder = use.parent  # type: ignore[attr-defined]
            if not isinstance(holder, ast.Attribute) or holder.value is not use:
                raise StubUseError(f"{filename}:{use.lineno}: the {service} stub is used other than by calling a "
                                   "method of it")
            called.add(f"/{service}/{holder.attr}")
    return called


def package_stub_calls(folder: Path) -> set[str]:
    """The gRPC paths every module under folder calls through stubs."""
    called: set[str] = set()
    for path in sorted(folder.rglob("*.py")):
        called |= stub_calls(path.read_text(), str(path.relative_to(ROOT)))
    return called


def stub_attributes(source: str) -> dict[str, str]:
    """Stubs a class keeps on self for other modules to call (`self.users = UserServiceStub(channel)` in
    services/tessera_graphql/upstream.py): attribute name → the stub's service."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    modules, classes = _stub_constructors(tree)
    found = {}
    for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
        service = _stub_service(call, modules, classes)
        parent = getattr(call, "parent", None)
        if service and isinstance(parent, ast.Assign) and len(parent.targets) == 1:
            target = parent.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                found[target.attr] = service
    return found


def exposed_stub_calls(folder: Path) -> set[str]:
    """The gRPC paths a package calls through stubs another of its classes holds: every `<x>.<stub attribute>.<Method>`
    (`self.upstream.inventory.BatchGetProducts`, `lambda u: u.orders.CreateOrder`) in any of its modules. gRPC
    method names are capitalised, which tells a stub's method from an attribute of another object of the same name
    (a DataLoader `users.load`)."""
    attributes: dict[str, str] = {}
    paths = sorted(folder.rglob("*.py"))
    for path in paths:
        attributes.update(stub_attributes(path.read_text()))
    called: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr in attributes and node.attr[:1].isupper()):
                called.add(f"/{attributes[node.value.attr]}/{node.attr}")
    return called


def call_problems(caller: str, called: Iterable[str], declared: Iterable[str]) -> list[str]:
    """How the methods a caller's code calls and those the catalog grants it differ (empty when they agree)."""
    called, declared = set(called), set(declared)
    return ([f"{caller} calls {p}, which services/tessera_deploy/catalog.py SERVICE_CALLS does not grant it"
             for p in sorted(called - declared)]
            + [f"SERVICE_CALLS grants {caller} {p}, which its code never calls" for p in sorted(declared - called)])
