"""Tessera from Python: create a customer, read it back, list a page, and read a typed error.

    .venv/bin/python clients/python/examples/quickstart.py --target 127.0.0.1:50051
    .venv/bin/python clients/python/examples/quickstart.py --target 127.0.0.1:8080 --token "$TOKEN"   # gateway

The second form goes through the Envoy gateway over native gRPC. It reads back an account it just created and
lists every account, which only staff may do: the token needs the admin scope
(`tessera token mint --sub ops --scope "admin"`).
"""

from __future__ import annotations

import argparse
import sys
import uuid

import grpc
from google.protobuf import json_format
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api

from tessera_client import RpcFailure, connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the user service or gateway")
    parser.add_argument("--token", help="JWT for the gateway")
    parser.add_argument("--email", default=f"ada-{uuid.uuid4().hex[:8]}@example.com")
    args = parser.parse_args(argv)

    # Every call gets a 5 s deadline unless it passes timeout=; GetUser and ListUsers are retried on UNAVAILABLE
    # because their contract marks them NO_SIDE_EFFECTS; CreateUser is not, so it carries a request_id instead:
    # repeating it with the same request_id is safe and returns the first result.
    with connect(args.target, token=args.token, timeout=5.0) as tessera:
        created = tessera.users.CreateUser(user_api.CreateUserRequest(
            user=user_pb2.User(email=args.email, display_name="Ada Lovelace",
                               profile=user_pb2.Profile(given_name="Ada", family_name="Lovelace", locale="en")),
            request_id=f"quickstart-{args.email}",
        ))
        user = created.user
        print(f"created {user.id} {user_pb2.UserStatus.Name(user.status)} version {user.version} "
              f"at {user.create_time.ToJsonString()}")

        fetched = tessera.users.GetUser(user_api.GetUserRequest(id=user.id), timeout=2.0)
        print("read back:", json_format.MessageToJson(fetched.user, indent=None))

        page = tessera.users.ListUsers(user_api.ListUsersRequest(page_size=2))
        print(f"first page: {len(page.users)} users, next_page_token {'set' if page.next_page_token else 'empty'}")

        try:
            tessera.users.GetUser(user_api.GetUserRequest(id=str(uuid.uuid4())))
        except grpc.RpcError as err:
            failure = RpcFailure.of(err)
            domain = failure.error_info.domain if failure.error_info is not None else "no ErrorInfo"
            print(f"unknown id: {failure.code.name} {failure.reason} ({domain})")

        try:
            tessera.users.CreateUser(user_api.CreateUserRequest(user=user_pb2.User(email="nope"), request_id="x"))
        except grpc.RpcError as err:
            failure = RpcFailure.of(err)
            print(f"invalid input: {failure.code.name}; " +
                  "; ".join(f"{field}: {why}" for field, why in sorted(failure.field_violations.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
