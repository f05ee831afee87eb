"""Tessera's Python client: the generated stubs of every contract behind one documented connect() helper.

    from tessera_client import connect
    from tessera.user.v1 import user_pb2, user_service_pb2 as user_api

    with connect("127.0.0.1:50051", token=my_jwt, timeout=5.0) as tessera:
        reply = tessera.users.GetUser(user_api.GetUserRequest(id=user_id))

`connect()` gives each call a deadline (the `timeout` when the call sets none), retries only the methods the
contracts mark NO_SIDE_EFFECTS or IDEMPOTENT, and sends `authorization: Bearer <token>` when a token is given.
`aio_connect()` is the same for asyncio. `RpcFailure.of(err)` reads the ErrorInfo and BadRequest details of a
failed call.
"""

from tessera_client.channel import (
    DEFAULT_TIMEOUT_SECONDS,
    RETRYABLE_STATUS_CODES,
    AsyncTesseraClient,
    TesseraClient,
    aio_connect,
    connect,
    retryable_methods,
    service_config,
)
from tessera_client.errors import RpcFailure
from tessera_client.services import SERVICES

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "RETRYABLE_STATUS_CODES",
    "SERVICES",
    "AsyncTesseraClient",
    "RpcFailure",
    "TesseraClient",
    "aio_connect",
    "connect",
    "retryable_methods",
    "service_config",
]
