"""What a failed Tessera call says: status code, message, and its google.rpc ErrorInfo and BadRequest details."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class RpcFailure:
    """A failed call, read from a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError`.

    Every Tessera error carries an ErrorInfo (`reason` is one of the service's ErrorReason names, or of
    tessera.common.v1.ErrorReason for the reasons every service shares, without the prefix; `domain` is e.g.
    "order.tessera.dev"); invalid input also carries a BadRequest naming each field.
    """

    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None

    @classmethod
    def of(cls, err: grpc.RpcError) -> RpcFailure:
        code: grpc.StatusCode = err.code()
        message: str = err.details() or ""
        info = bad = None
        # Sync calls give a tuple of (key, value) metadata, asyncio calls a Metadata object: both iterate pairs.
        trailing: Any = err.trailing_metadata()
        for key, value in trailing or ():
            if key != _DETAILS_KEY:
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
        return cls(code=code, message=message, error_info=info, bad_request=bad)

    @property
    def reason(self) -> str | None:
        """ErrorInfo.reason, e.g. "USER_NOT_FOUND", or None when the error has no ErrorInfo."""
        return self.error_info.reason if self.error_info is not None else None

    @property
    def field_violations(self) -> dict[str, str]:
        """The BadRequest field violations as {request field path: description}; empty when there are none."""
        if self.bad_request is None:
            return {}
        return {v.field: v.description for v in self.bad_request.field_violations}
