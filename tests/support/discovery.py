"""Real Tessera servers of a user service that answer with their own name, for the discovery tests: which instance
answered each call is what a caller sees."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable

from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime.discovery import BalancedChannel, DiscoverySettings, registration
from tessera_runtime.server import ServiceModule, TesseraServer

USER_SERVICE = svc.DESCRIPTOR.services_by_name["UserService"]
FAST = dict(check_seconds=0.1, check_timeout_seconds=0.5)


class NamedUsers(user_service_pb2_grpc.UserServiceServicer):
    """A user service that answers GetUser with its own name, so that a caller sees which instance answered."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def GetUser(self, request, context):
        return svc.GetUserResponse(user=user_pb2.User(id=request.id, display_name=self.name))


class HeldUsers(NamedUsers):
    """A user service whose GetUser calls wait until `release` is set: calls in flight for as long as a test
    needs."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()
        self.held = 0

    async def GetUser(self, request, context):
        self.held += 1
        await self.release.wait()
        return await super().GetUser(request, context)


@dataclasses.dataclass
class Instance:
    name: str
    server: TesseraServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


class UserServers:
    """Starts real Tessera servers of a user service on port 0; those given discovery settings with a registry
    register themselves in it as `tessera serve` does. `stop_all()` stops them gracefully."""

    def __init__(self) -> None:
        self.started: list[TesseraServer] = []

    async def start(self, name: str, *, settings: DiscoverySettings | None = None, drain: float = 0.0,
                    servicer: NamedUsers | None = None) -> Instance:
        servicer = servicer or NamedUsers(name)
        module = ServiceModule(
            service_names=(USER_SERVICE.full_name,),
            register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server),
            domain="user.tessera.dev")
        server = TesseraServer(
            module, readiness_interval=3600, drain_seconds=drain, grace_seconds=1,
            registration=None if settings is None else (
                lambda s: registration(settings, "user", "127.0.0.1", s.port, ready=lambda: s.readiness.ready)))
        await server.start()
        self.started.append(server)
        return Instance(name, server)

    async def stop_all(self) -> None:
        for server in self.started:
            await server.stop()


async def answers(channel: BalancedChannel, calls: int) -> collections.Counter[str]:
    """Which instance answered each of `calls` GetUser calls through `channel`."""
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    seen: collections.Counter[str] = collections.Counter()
    for n in range(calls):
        seen[(await stub.GetUser(svc.GetUserRequest(id=f"u{n}"))).user.display_name] += 1
    return seen


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def serving(channel: BalancedChannel) -> set[str]:
    """The addresses discovery found serving at its last round."""
    return {i.address for i in channel.discovery.discover()}
