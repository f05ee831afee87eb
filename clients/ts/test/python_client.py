"""Makes the calls the Node suite describes with the Python client and prints what Python sees, as JSON.

Input on stdin: {"targets": {"<service full name>" or "*": "host:port"}, "token": optional JWT, "calls":
[{"method": "pkg.Service/Method", "request": {proto3 JSON}}]}; "*" is the target of services not named (the
gateway serves them all). Output on stdout: one entry per call, {"response": proto3 JSON} or {"error": {code,
message, errorInfo, badRequest}}, the same shapes the Node suite builds with toJson, so the two compare as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from tessera_client import RpcFailure, TesseraClient, connect
from tessera_client.services import SERVICES, attribute_of


def _method(full_name: str):
    service_name, method_name = full_name.split("/")
    for service in SERVICES:
        if service.descriptor.full_name == service_name:
            return service.descriptor.methods_by_name[method_name]
    raise KeyError(f"{service_name} is not a Tessera service")


def _failure(err: grpc.RpcError) -> dict[str, Any]:
    failure = RpcFailure.of(err)
    out: dict[str, Any] = {"code": failure.code.name, "message": failure.message}
    if failure.error_info is not None:
        out["errorInfo"] = json_format.MessageToDict(failure.error_info)
    if failure.bad_request is not None:
        out["badRequest"] = json_format.MessageToDict(failure.bad_request)
    return out


def main() -> int:
    spec = json.load(sys.stdin)
    targets: dict[str, str] = spec["targets"]
    clients: dict[str, TesseraClient] = {}
    results: list[dict[str, Any]] = []
    try:
        for call in spec["calls"]:
            method = _method(call["method"])
            service = method.containing_service.full_name
            target = targets.get(service) or targets["*"]
            if target not in clients:
                clients[target] = connect(target, token=spec.get("token"), timeout=30.0)
            request: Message = message_factory.GetMessageClass(method.input_type)()
            json_format.ParseDict(call["request"], request)
            stub = getattr(clients[target], attribute_of(service))
            try:
                response = getattr(stub, method.name)(request)
            except grpc.RpcError as err:
                results.append({"error": _failure(err)})
            else:
                results.append({"response": json_format.MessageToDict(response)})
    finally:
        for client in clients.values():
            client.close()
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
