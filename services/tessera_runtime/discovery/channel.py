"""Health-filtered discovery of one service's instances, and a channel that balances each call over them.

gRPC Python cannot plug a load-balancing policy of its own into gRPC's C core, so the balancing happens above
it: `BalancedChannel` is what `tessera_runtime.clients.open_channel` returns for a discovery address, and is used
like any grpc.aio channel (generated stubs, `dependency_check`). Its calls go through a channel carrying the same
interceptors as every other (metrics, the caller's deadline and ids, the circuit breaker of the dependency,
tracing); the innermost of them picks a healthy instance and sends the call on that instance's own channel,
which keeps the contracts' retry policy (so an idempotent call retried by gRPC is retried on the instance picked).

The circuit breaker stays one per dependency, as for a fixed address: an instance that fails is the health
checks' business (it stops being picked within a check interval, at once if its connection is refused), while
the breaker answers for the service as a whole, including when no instance of it is healthy."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_runtime import metrics
from tessera_runtime.discovery.balancing import BALANCERS
from tessera_runtime.discovery.model import DiscoverySettings, ServiceInstance
from tessera_runtime.discovery.registry import UNAVAILABLE, ServiceRegistry
from tessera_runtime.periodic import cancel
from tessera_runtime.resilience import unavailable_error

log = logging.getLogger("tessera.discovery")

HEALTH_METHODS = "/grpc.health.v1.Health/"
SERVING = health_pb2.HealthCheckResponse.SERVING
# gRPC core's words for a call that never reached a server (no connection could be made; pick_first's and
# round_robin's): safe to send again to another instance, whatever the method, as nothing of it was sent.
_NOT_CONNECTED = ("failed to connect to all addresses", "connections to all backends failing")
# How long the channel of an instance no longer registered stays open for the calls still in flight on it; each
# ends sooner, at its own deadline.
FORGOTTEN_GRACE_SECONDS = 60.0


@dataclasses.dataclass
class _Known:
    """What discovery knows of one address: its registrations (several worker processes may serve one port), its
    channel and health stub, the calls in flight on it, and since when it has failed its health checks."""

    registrations: list[ServiceInstance]
    channel: grpc.aio.Channel
    health: health_pb2_grpc.HealthStub
    serving: bool = False
    critical_since: float | None = None
    calls: set[Any] = dataclasses.field(default_factory=set)
    # The unexpected errors its checks and its deregistration met since it last served (each logged once).
    troubles: set[str] = dataclasses.field(default_factory=set)

    @property
    def instance(self) -> ServiceInstance:
        """The address's first registration: what is picked, checked and logged for it."""
        return self.registrations[0]


class HealthFilteredDiscovery:
    """The instances of `service` in `registry` whose gRPC health answers SERVING, checked every `check_seconds`
    with a `check_timeout_seconds` deadline (Check, service "" = the instance's readiness, or its registration's
    `health_check`). An instance that fails its checks for `deregister_after_seconds` is deregistered when the
    registry prunes (Consul's deregister_critical_service_after). While the registry cannot be read, the instances
    last read stand (and are still checked). Used from one event loop; closes the registry when closed."""

    def __init__(self, name: str, service: str, registry: ServiceRegistry, settings: DiscoverySettings,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.name = name
        self.service = service
        self.registry = registry
        self.settings = settings
        # A stopped instance that comes back is reconnected to within about a check interval, not after gRPC's
        # default back-off of up to two minutes. gRPC core takes grpc.min_reconnect_backoff_ms for the least time
        # it gives a connection attempt (its min connect timeout), not for a back-off: an attempt is given as long
        # as a check is, or an instance slower to connect than a check interval would never be found serving.
        backoff_ms = max(100, int(settings.check_seconds * 1000))
        connect_ms = max(100, int(settings.check_timeout_seconds * 1000))
        self.channel_options = [*channel_options, ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                                ("grpc.min_reconnect_backoff_ms", connect_ms),
                                ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 1000))]
        self.balancer = BALANCERS[settings.balancing]()
        self._known: dict[str, _Known] = {}
        self._healthy: list[ServiceInstance] = []
        self._multicallables: dict[tuple[str, str], Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._first_round: asyncio.Event | None = None
        self._picks: dict[str, Any] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._registry_away = False
        self._closed = False

    # -- discovery ---------------------------------------------------------------------------------------------

    async def ready(self) -> None:
        """Starts the checks if they are not running, and waits for the first round of them. Once closed, raises
        what a call on a closed grpc.aio channel raises (nothing is started again)."""
        if self._closed:
            raise closed_channel()
        if self._task is None:
            self._first_round = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"discovery {self.name}")
        assert self._first_round is not None
        if not self._first_round.is_set():
            await self._first_round.wait()

    @property
    def closed(self) -> bool:
        return self._closed

    def discover(self) -> list[ServiceInstance]:
        """The healthy instances, as of the last round of checks."""
        return list(self._healthy)

    async def refresh(self) -> list[ServiceInstance]:
        """One round now: the registry read again and every instance checked."""
        if self._closed:
            raise closed_channel()
        await self._round()
        return self.discover()

    def pick(self, *, rotate: bool = True) -> ServiceInstance | None:
        """The healthy instance the balancer picks; with rotate=False the first healthy one, moving nothing
        (health probes of the dependency are no traffic to balance)."""
        if not rotate:
            return self._healthy[0] if self._healthy else None
        instance = self.balancer.pick()
        if instance is not None:
            counter = self._picks.get(instance.address)
            if counter is None:
                counter = self._picks[instance.address] = metrics.DISCOVERY_PICKS.labels(self.name, instance.address)
            counter.inc()
        return instance

    def eject(self, instance: ServiceInstance) -> None:
        """A call found the instance unreachable: stop picking it until its health answers SERVING again."""
        known = self._known.get(instance.address)
        if known is not None and known.serving:
            known.serving = False
            log.warning("instance unreachable, no longer picked", extra={
                "dependency": self.name, "address": instance.address})
            self._publish()

    def channel_for(self, instance: ServiceInstance) -> grpc.aio.Channel:
        return self._known[instance.address].channel

    def in_flight(self, instance: ServiceInstance, call):
        """`call`, made on the channel of `instance`: once the instance is forgotten, its channel stays open until
        the calls in flight on it end (within FORGOTTEN_GRACE_SECONDS)."""
        known = self._known.get(instance.address)
        if known is not None:
            known.calls.add(call)
            call.add_done_callback(known.calls.discard)
        return call

    def multicallable(self, instance: ServiceInstance, method: str, request_serializer, response_deserializer):
        key = (instance.address, method)
        found = self._multicallables.get(key)
        if found is None:
            found = self._known[instance.address].channel.unary_unary(
                method, request_serializer=request_serializer, response_deserializer=response_deserializer,
                _registered_method=True)
            self._multicallables[key] = found
        return found

    async def close(self) -> None:
        self._closed = True
        await cancel(self._task)
        self._task = None
        for known in self._known.values():
            await known.channel.close()
        self._known.clear()
        # The channels of forgotten instances are closed now too, cutting their grace short.
        for retiring in list(self._retiring):
            retiring.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self._multicallables.clear()
        self._publish()  # nothing is picked any more
        await self.registry.close()

    # -- the rounds of checks ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._first_round is not None
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a registry that cannot be read this time: the last known instances stand
                log.exception("discovery round failed", extra={"dependency": self.name})
            self._first_round.set()
            await asyncio.sleep(self.settings.check_seconds)

    async def _read_registry(self) -> list[ServiceInstance] | None:
        """The registered instances, or None while the registry cannot be read (said once per outage)."""
        try:
            registered = await self.registry.instances(self.service)
        except Exception as exc:  # away, or refusing (a read-only standby that cannot delete stale rows)
            if not self._registry_away:
                self._registry_away = True
                away = isinstance(exc, UNAVAILABLE)
                log.log(logging.WARNING if away else logging.ERROR,
                        "registry cannot be read: the last known instances stand until it can",
                        exc_info=None if away else exc, extra={
                            "dependency": self.name, "instances": len(self._known), "error": str(exc)})
            return None
        if self._registry_away:
            self._registry_away = False
            log.info("registry read again", extra={"dependency": self.name, "instances": len(registered)})
        return registered

    async def _round(self) -> None:
        registered = await self._read_registry()
        if registered is not None:
            await self._update(registered)
        await self._check_all()

    async def _update(self, registered: list[ServiceInstance]) -> None:
        by_address: dict[str, list[ServiceInstance]] = {}
        for instance in registered:
            by_address.setdefault(instance.address, []).append(instance)
        for address in list(self._known):
            if address not in by_address:
                await self._forget(address)
        for address, registrations in by_address.items():
            known = self._known.get(address)
            if known is None:
                channel = grpc.aio.insecure_channel(address, options=self.channel_options)
                self._known[address] = _Known(registrations, channel,
                                              health_pb2_grpc.HealthStub(channel))
            else:
                known.registrations = registrations

    async def _check_all(self) -> None:
        known_now = list(self._known.values())
        results = await asyncio.gather(*(self._check(k) for k in known_now))
        now = time.monotonic()
        for known, serving in zip(known_now, results, strict=True):
            if serving != known.serving:
                log.info("instance %s", "serving" if serving else "not serving", extra={
                    "dependency": self.name, "address": known.instance.address})
            known.serving = serving
            if serving:
                known.critical_since = None
                known.troubles.clear()
                continue
            if known.critical_since is None:
                known.critical_since = now
            if self.registry.prunes and now - known.critical_since >= self.settings.deregister_after_seconds:
                try:
                    for registration in known.registrations:
                        await self.registry.deregister(registration)
                except UNAVAILABLE:  # pruned in a later round, once the registry is back
                    continue
                except Exception as exc:  # a registry refusing the deletion: tried again in a later round
                    self._unexpected(known, "instance deregistration failed: tried again at the next round", exc)
                    continue
                log.warning("instance deregistered: not serving for %.1f s", now - known.critical_since, extra={
                    "dependency": self.name, "address": known.instance.address,
                    "instance_ids": [r.id for r in known.registrations]})
                await self._forget(known.instance.address)
        self._publish()

    async def _check(self, known: _Known) -> bool:
        try:
            reply = await known.health.Check(health_pb2.HealthCheckRequest(service=known.instance.health_check),
                                             timeout=self.settings.check_timeout_seconds)
        except grpc.aio.AioRpcError:
            return False
        except Exception as exc:  # a check that cannot be sent (a health check name that is not UTF-8), a defect
            self._unexpected(known, "health check failed: the instance is taken for not serving", exc)
            return False
        return reply.status == SERVING

    def _unexpected(self, known: _Known, message: str, exc: Exception) -> None:
        """An error no round expects, about one instance: logged at ERROR once until the instance serves again, and
        the other instances' round goes on."""
        trouble = f"{message}: {type(exc).__name__}: {exc}"
        if trouble not in known.troubles:
            known.troubles.add(trouble)
            log.error(message, exc_info=exc, extra={"dependency": self.name, "address": known.instance.address,
                                                    "error": str(exc)})

    async def _forget(self, address: str) -> None:
        known = self._known.pop(address, None)
        if known is None:
            return
        self._publish()  # no call picks it from now on
        self._multicallables = {k: v for k, v in self._multicallables.items() if k[0] != address}
        retiring = asyncio.get_running_loop().create_task(self._retire(known), name=f"retire {address}")
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(known: _Known) -> None:
        """Closes the channel of a forgotten instance once the calls in flight on it (a deregistered instance
        drains them) have ended, each within its own deadline, or after FORGOTTEN_GRACE_SECONDS; at once if the
        discovery closes meanwhile. Not grpc's close(grace): once that has begun, a close without grace is a no-op,
        so a grace cut short would leave the channel open until collected."""
        try:
            ending = [asyncio.ensure_future(call.code()) for call in known.calls]
            if ending:
                await asyncio.wait(ending, timeout=FORGOTTEN_GRACE_SECONDS)
        finally:
            await known.channel.close()

    def _publish(self) -> None:
        healthy = sorted((k.instance for k in self._known.values() if k.serving), key=lambda i: i.address)
        if [i.address for i in healthy] != [i.address for i in self._healthy] or \
                [i.weight for i in healthy] != [i.weight for i in self._healthy]:
            self.balancer.update(healthy)
        self._healthy = healthy
        metrics.DISCOVERY_INSTANCES.labels(self.name, "serving").set(len(healthy))
        metrics.DISCOVERY_INSTANCES.labels(self.name, "not_serving").set(len(self._known) - len(healthy))


def closed_channel() -> grpc.aio.UsageError:
    """What a call on a closed grpc.aio channel raises."""
    return grpc.aio.UsageError("Channel is closed.")


def deadline_exceeded() -> grpc.aio.AioRpcError:
    """The error of a call whose deadline passed before an instance was picked: gRPC's own for a deadline."""
    return grpc.aio.AioRpcError(code=grpc.StatusCode.DEADLINE_EXCEEDED, initial_metadata=grpc.aio.Metadata(),
                                trailing_metadata=grpc.aio.Metadata(), details="Deadline Exceeded")


def no_healthy_instance(name: str, service: str) -> grpc.aio.AioRpcError:
    """The error of a call that found no healthy instance."""
    return unavailable_error(f"no healthy instance of {service}", reason="NO_HEALTHY_INSTANCE",
                             metadata={"service": service, "dependency": name})


class _PickInstance(grpc.aio.UnaryUnaryClientInterceptor):
    """The innermost interceptor of a BalancedChannel: sends the call to the instance the balancer picks instead
    of the channel's own (unconnected) target."""

    def __init__(self, discovery: HealthFilteredDiscovery, serializers: dict[str, tuple[Any, Any]]) -> None:
        self.discovery = discovery
        self.serializers = serializers

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        discovery = self.discovery
        timeout = client_call_details.timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            # The first round of checks (a registry slow to answer, instances slow to check) is part of the call:
            # it waits no longer than the call's deadline, and the call then has what is left of it.
            await asyncio.wait_for(discovery.ready(), timeout)
        except TimeoutError:
            raise deadline_exceeded() from None
        request_serializer, response_deserializer = self.serializers[method]
        rotate = not method.startswith(HEALTH_METHODS)
        tried: set[str] = set()
        while True:
            instance = discovery.pick(rotate=rotate)
            if instance is None or instance.address in tried:
                raise no_healthy_instance(discovery.name, discovery.service)
            if deadline is not None:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    raise deadline_exceeded()
            call = discovery.in_flight(instance, discovery.multicallable(
                instance, method, request_serializer, response_deserializer)(
                request, timeout=timeout, metadata=client_call_details.metadata,
                credentials=client_call_details.credentials, wait_for_ready=client_call_details.wait_for_ready))
            try:
                await call
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.UNAVAILABLE and (err.details() or "").lower().startswith(
                        _NOT_CONNECTED):
                    # Nothing was sent: another instance may take the call, and this one is not picked again
                    # until its health answers.
                    discovery.eject(instance)
                    tried.add(instance.address)
                    continue
                raise
            return call


class BalancedChannel:
    """A grpc.aio channel lookalike whose unary calls each go to a healthy instance the balancer picks, through
    the interceptors of `open_channel`. Streaming calls (none of Tessera's contracts has one) go to a picked
    instance directly, as they would bypass those unary interceptors on any channel."""

    def __init__(self, name: str, discovery: HealthFilteredDiscovery,
                 interceptors: Sequence[grpc.aio.ClientInterceptor]) -> None:
        self.name = name
        self.discovery = discovery
        self._serializers: dict[str, tuple[Any, Any]] = {}
        # The front channel is never connected: its innermost interceptor sends each call elsewhere. A name in the
        # reserved .invalid domain, so that nothing could be reached by mistake.
        self._front = grpc.aio.insecure_channel(
            "dns:///tessera-discovery.invalid:1",
            interceptors=[*interceptors, _PickInstance(discovery, self._serializers)])

    def unary_unary(self, method: str, request_serializer=None, response_deserializer=None,
                    _registered_method: bool | None = False):
        self._serializers[method] = (request_serializer, response_deserializer)
        return self._front.unary_unary(method, request_serializer=request_serializer,
                                       response_deserializer=response_deserializer)

    def _picked(self, kind: str, method: str, request_serializer, response_deserializer):
        def call(*args, **kwargs):
            if self.discovery.closed:
                raise closed_channel()
            instance = self.discovery.pick()
            if instance is None:
                raise no_healthy_instance(self.name, self.discovery.service)
            factory = getattr(self.discovery.channel_for(instance), kind)
            return self.discovery.in_flight(instance, factory(
                method, request_serializer=request_serializer, response_deserializer=response_deserializer)(
                *args, **kwargs))

        return call

    def unary_stream(self, method: str, request_serializer=None, response_deserializer=None,
                     _registered_method: bool | None = False):
        return self._picked("unary_stream", method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, request_serializer=None, response_deserializer=None,
                     _registered_method: bool | None = False):
        return self._picked("stream_unary", method, request_serializer, response_deserializer)

    def stream_stream(self, method: str, request_serializer=None, response_deserializer=None,
                      _registered_method: bool | None = False):
        return self._picked("stream_stream", method, request_serializer, response_deserializer)

    async def close(self, grace: float | None = None) -> None:
        await self._front.close(grace)
        await self.discovery.close()

    async def __aenter__(self) -> BalancedChannel:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
