"""Generates Python stubs and the Envoy descriptor set from proto/, reproducibly and offline."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
THIRD_PARTY = ROOT / "build" / "third_party" / "proto"
GEN_PY = ROOT / "gen" / "python"
GEN_DESCRIPTORS = ROOT / "gen" / "descriptors"
DESCRIPTOR_SET = GEN_DESCRIPTORS / "tessera.pb"
MYPY_GRPC_PLUGIN = Path(sys.executable).parent / "protoc-gen-mypy_grpc"

# Google protos the contracts import, plus the rich-error protos Envoy needs to render error details as JSON.
GOOGLE_PROTOS = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/api/field_behavior.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
)
RICH_ERROR_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def _site_packages() -> Path:
    return Path(grpc_tools.__file__).resolve().parent.parent


def copy_third_party() -> None:
    """Copies the google protos from the installed googleapis-common-protos wheel into build/third_party."""
    site = _site_packages()
    for rel in GOOGLE_PROTOS:
        src = site / rel
        if not src.exists():
            raise SystemExit(f"codegen: {rel} not found in googleapis-common-protos at {src}")
        dst = THIRD_PARTY / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)


def contract_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))


def _protoc(args: list[str]) -> None:
    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    argv = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{THIRD_PARTY}", f"-I{wkt}", *args]
    code = protoc.main(argv)
    if code != 0:
        raise SystemExit(f"codegen: protoc failed ({code}) for {' '.join(args[-3:])}")


def generate_python(files: list[str]) -> None:
    tmp = GEN_PY.with_name("python.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    typed_grpc = []
    if MYPY_GRPC_PLUGIN.exists():
        # mypy-protobuf (a dev dependency) types the gRPC stubs too: FooServiceStub and FooServiceAsyncStub with
        # each method's request and response. Images built with runtime dependencies only do without.
        typed_grpc = [f"--plugin=protoc-gen-mypy_grpc={MYPY_GRPC_PLUGIN}", f"--mypy_grpc_out=quiet:{tmp}"]
    _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *typed_grpc, *files])
    # Generated packages are implicit namespace packages except for the leaf, which gets an __init__ so that
    # type checkers and importlib.resources treat every level the same way.
    for directory in sorted({p.parent for p in tmp.rglob("*_pb2.py")}):
        d = directory
        while d != tmp:
            (d / "__init__.py").touch()
            d = d.parent
    shutil.rmtree(GEN_PY, ignore_errors=True)
    tmp.rename(GEN_PY)


def generate_descriptor_set(files: list[str]) -> None:
    GEN_DESCRIPTORS.mkdir(parents=True, exist_ok=True)
    _protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={DESCRIPTOR_SET}",
             *files, *RICH_ERROR_PROTOS])


def digest() -> str:
    h = hashlib.sha256()
    for path in [*sorted(GEN_PY.rglob("*")), DESCRIPTOR_SET]:
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--print-digest", action="store_true", help="print a hash of everything generated")
    args = parser.parse_args(argv)
    copy_third_party()
    files = contract_files()
    if not files:
        raise SystemExit(f"codegen: no .proto files under {PROTO_DIR}")
    generate_python(files)
    generate_descriptor_set(files)
    print(f"codegen: {len(files)} contracts -> {GEN_PY.relative_to(ROOT)}, {DESCRIPTOR_SET.relative_to(ROOT)}")
    if args.print_digest:
        print(digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
