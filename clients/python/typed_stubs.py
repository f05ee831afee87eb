"""Adds type stubs (.pyi) for the generated gRPC stubs in gen/python, so clients get typed methods.

`make gen` generates messages with .pyi types and untyped *_pb2_grpc.py stubs; mypy-protobuf's
protoc-gen-mypy_grpc writes *_pb2_grpc.pyi beside them: FooServiceStub(channel) with each method typed by its
request and response, and FooServiceAsyncStub for grpc.aio channels. Run by `make clients`, after `make gen`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

from tessera_build.codegen import GEN_PY, PROTO_DIR, THIRD_PARTY, contract_files

PLUGIN = Path(sys.executable).parent / "protoc-gen-mypy_grpc"


def main() -> int:
    if not GEN_PY.is_dir():
        raise SystemExit(f"typed_stubs: {GEN_PY} is missing; run `make gen` first")
    if not PLUGIN.exists():
        raise SystemExit(f"typed_stubs: {PLUGIN} is missing; mypy-protobuf is a dev dependency (make venv)")
    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    files = contract_files()
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{THIRD_PARTY}", f"-I{wkt}",
                        f"--plugin=protoc-gen-mypy_grpc={PLUGIN}", f"--mypy_grpc_out=quiet:{GEN_PY}", *files])
    if code != 0:
        raise SystemExit(f"typed_stubs: protoc failed ({code})")
    print(f"typed_stubs: {len(files)} contracts -> gen/python/**/*_pb2_grpc.pyi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
