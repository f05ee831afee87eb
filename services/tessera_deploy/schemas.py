"""Schema validation offline: Kubernetes objects against a pinned Kubernetes version, Istio objects against its CRDs.

Both are strict: a field the schema does not know is an error, as it is for `kubectl apply` with server-side
strict field validation, so a misspelt field cannot slip through as "unknown, ignored".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

from tessera_deploy import K8S_DIR
from tessera_deploy.render import load_all

# The Kubernetes version whose object schemas the manifests must satisfy (kubernetes-validate ships them).
KUBERNETES_VERSION = "1.35.0"
ISTIO_CRDS_ENV = "TESSERA_ISTIO_CRDS"
ISTIO_CRDS = K8S_DIR / "schemas" / "istio-1.30.3-crd-all.gen.yaml"
_K8S_SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = {"$ref": f"{_DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}

# Kinds of operators this repository has no schema for. They are checked by meaning (checks.py: a ServiceMonitor
# must select a Service and name one of its ports; the PrometheusRule must hold the rules file's groups, carry the
# monitors' labels and alert on exactly the monitored jobs; the AlertmanagerConfig must be what its source renders
# and name only receivers it defines and alerts the rules have), never silently: any other kind without a schema is
# an error.
SEMANTIC_ONLY_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                       ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig")}


@dataclasses.dataclass(frozen=True)
class SchemaError:
    """One way an object breaks its schema: the field (dotted path) and what is wrong there."""

    field: str
    message: str


def field_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(object)"


def _schema_dir() -> Path:
    major_minor = ".".join(KUBERNETES_VERSION.split(".")[:2])
    path = _K8S_SCHEMAS / f"v{major_minor}.0-local-strict"
    if not path.is_dir():
        raise FileNotFoundError(f"kubernetes-validate has no schemas for Kubernetes {KUBERNETES_VERSION} ({path})")
    return path


@cache
def _k8s_registry() -> Registry:
    definitions = json.loads((_schema_dir() / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@cache
def _k8s_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    # kubernetes-validate names files <kind>-<group without domain>-<version>.json, e.g. deployment-apps-v1.json.
    group, _, version = api_version.rpartition("/")
    group_short = group.split(".")[0]
    name = f"{kind.lower()}-{group_short + '-' if group else ''}{version}.json"
    path = _schema_dir() / name
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry())


def istio_crds_path() -> Path:
    override = os.environ.get(ISTIO_CRDS_ENV)
    return Path(override) if override else ISTIO_CRDS


# Istio guards its duration fields with this CEL rule. JSON Schema cannot run CEL, but the rule's substance, a
# well-formed non-zero Go duration, fits a pattern; the CRDs' other CEL rules are not evaluated.
_DURATION_RULE = "duration(self) >= duration('1ms')"
GO_DURATION = r"^(?=.*[1-9])([0-9]+(\.[0-9]+)?(h|m|s|ms|us|µs|ns))+$"


def _to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema, closed where Kubernetes would reject unknown fields."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items()
           if k not in ("nullable", "x-kubernetes-validations", "description")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if any(v.get("rule") == _DURATION_RULE for v in node.get("x-kubernetes-validations") or []):
        out["pattern"] = GO_DURATION
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def _istio_schemas(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema of every served version in a CRD file."""
    found = {}
    for crd in load_all(path.read_text()):
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                found[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return found


@cache
def _istio_validator(path: Path, api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    openapi = _istio_schemas(path).get((api_version, kind))
    if openapi is None:
        return None
    schema = _to_json_schema(copy.deepcopy(openapi))
    schema["properties"].update(apiVersion={"const": api_version}, kind={"const": kind}, metadata=_OBJECT_META)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry())


def is_istio(obj: dict[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).split("/")[0].endswith(".istio.io")


def _errors(validator: jsonschema.Draft202012Validator, obj: dict[str, Any]) -> Iterator[SchemaError]:
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        # For oneOf/anyOf failures the most specific sub-error says what is actually wrong.
        best = jsonschema.exceptions.best_match([error]) if error.context else error
        message = best.message
        if best.validator == "pattern" and best.validator_value == GO_DURATION:
            message = f"{best.instance!r} is not a duration of at least 1ms, such as 250ms or 5s"
        yield SchemaError(field_path(best.absolute_path), message)


def validate(obj: dict[str, Any]) -> list[SchemaError]:
    """Every schema error of one object; an object of a kind with no known schema is itself an error."""
    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    if not api_version or not kind:
        return [SchemaError("apiVersion" if not api_version else "kind", "is required")]
    if is_istio(obj):
        path = istio_crds_path()
        validator = _istio_validator(path, api_version, kind)
        where = f"the Istio CRDs in {path}"
    else:
        validator = _k8s_validator(api_version, kind)
        where = f"Kubernetes {KUBERNETES_VERSION}"
    if validator is None:
        if (api_version, kind) in SEMANTIC_ONLY_KINDS:
            return []
        return [SchemaError("kind", f"{api_version} {kind} has no schema in {where}")]
    return list(_errors(validator, obj))
