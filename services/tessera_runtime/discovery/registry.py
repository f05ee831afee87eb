"""Where instances are registered: the ServiceRegistry port, an in-memory registry (the static lists of the
configuration) and a directory registry shared by the processes of one host (the PostgreSQL one, shared by several
hosts, is tessera_runtime.discovery.postgres), and the self-registration of a running server.

No library fits: the Python registry clients (python-consul, etcd3, kazoo) all talk to an agent or a cluster
(Consul, etcd, ZooKeeper) that a machine without a mesh does not run. The directory registry needs nothing: one
JSON file per instance, written to a temporary name and renamed into place, so a reader sees a whole
registration or none, and any number of processes register and deregister at once without a lock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from tessera_runtime.discovery.model import ServiceInstance, valid_name
from tessera_runtime.periodic import cancel

log = logging.getLogger("tessera.discovery")


class RegistryUnavailable(Exception):
    """The registry cannot be read or written just now (its database is down or unreachable); the message says
    which registry and why."""


# What a registry raises when it is away rather than wrong: registration retries, discovery keeps what it knew.
UNAVAILABLE = (OSError, RegistryUnavailable)


class ServiceRegistry(Protocol):
    """Instances by service. `instances` lists what is registered, healthy or not: discovery
    (tessera_runtime.discovery.HealthFilteredDiscovery) filters them by their gRPC health."""

    # Whether instances that stay unhealthy are deregistered (Consul's deregister_critical_service_after): a
    # registry that instances write themselves; never a static list from the configuration.
    prunes: bool

    async def register(self, instance: ServiceInstance) -> None: ...

    async def renew(self, instance: ServiceInstance) -> bool:
        """A registered instance's periodic renewal (its heartbeat, where the registry keeps one); the registration
        is written again if it had been removed, and then the answer is True."""
        ...

    async def deregister(self, instance: ServiceInstance) -> None: ...

    async def instances(self, service: str) -> list[ServiceInstance]: ...

    async def services(self) -> list[str]: ...

    async def close(self) -> None: ...


class InMemoryRegistry:
    """The instances of one process's memory: the static lists of TESSERA_<NAME>_SERVICE_ADDR=static:///..."""

    prunes = False

    def __init__(self, instances: Iterable[ServiceInstance] = ()) -> None:
        self._instances: dict[str, dict[str, ServiceInstance]] = {}
        for instance in instances:
            self._instances.setdefault(instance.service, {})[instance.id] = instance

    async def register(self, instance: ServiceInstance) -> None:
        self._instances.setdefault(instance.service, {})[instance.id] = instance

    async def renew(self, instance: ServiceInstance) -> bool:
        known = self._instances.setdefault(instance.service, {})
        missing = instance.id not in known
        known[instance.id] = instance
        return missing

    async def deregister(self, instance: ServiceInstance) -> None:
        self._instances.get(instance.service, {}).pop(instance.id, None)

    async def instances(self, service: str) -> list[ServiceInstance]:
        return list(self._instances.get(service, {}).values())

    async def services(self) -> list[str]:
        return sorted(s for s, found in self._instances.items() if found)

    async def close(self) -> None:
        return None


class FileRegistry:
    """A directory shared by the processes of one host: `<directory>/<service>/<instance id>.json`.

    Writes go to a temporary file in the same directory, flushed to disk, then renamed over the registration
    (atomic on POSIX), so readers never see half a file and concurrent registrations never collide (each instance
    has its own file). A file removed while listed is passed by; one that is no registration of its directory's
    service (written or edited by hand) is skipped, logged once per file and error at WARNING and kept in `skipped`
    (path: why) until it is read again, so that `tessera registry list` can say so."""

    prunes = True

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.skipped: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()

    def _path(self, instance: ServiceInstance) -> Path:
        if not valid_name(instance.service) or not valid_name(instance.id):
            raise ValueError(f"service {instance.service!r} and instance id {instance.id!r} must be letters, "
                             f"digits, '.', '_' or '-'")
        return self.directory / instance.service / f"{instance.id}.json"

    def register_now(self, instance: ServiceInstance) -> None:
        path = self._path(instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        # First, so that no reader ever lists the crashed process's registration beside this one.
        self._remove_crashed_at(instance)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{instance.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(instance.to_json(), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _remove_crashed_at(self, instance: ServiceInstance) -> None:
        """Removes the registrations at the instance's address left by processes of this host that are gone (killed
        without a graceful stop, then started again on their port). Health checks never prune those, since the
        address answers, and discovery would take the address's weight from one of them. A registration without a
        pid (written by hand), or whose process lives (another worker serving the port), stays."""
        for other in self.instances_now(instance.service):
            if other.id != instance.id and other.address == instance.address \
                    and _process_gone(other.metadata.get("pid", "")):
                try:
                    self.deregister_now(other)
                except (OSError, ValueError):  # not ours to remove (permissions, a name written by hand)
                    continue
                log.info("registration of a process that is gone removed", extra={
                    "instance_id": other.id, "address": other.address, "replaced_by": instance.id})

    def renew_now(self, instance: ServiceInstance) -> bool:
        if self.is_registered(instance):
            return False
        self.register_now(instance)
        return True

    def deregister_now(self, instance: ServiceInstance) -> None:
        self._path(instance).unlink(missing_ok=True)

    def is_registered(self, instance: ServiceInstance) -> bool:
        return self._path(instance).exists()

    def instances_now(self, service: str) -> list[ServiceInstance]:
        if not valid_name(service):
            return []
        found = []
        for path in sorted((self.directory / service).glob("[!.]*.json")):
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:  # deregistered since listed
                continue
            except OSError as exc:
                self._skip(path, f"cannot be read: {exc}")
                continue
            except ValueError as exc:
                self._skip(path, f"not JSON: {exc}")
                continue
            try:
                if not isinstance(data, dict):
                    raise ValueError("not a service instance: not a JSON object")
                instance = ServiceInstance.from_json(data)
            except ValueError as exc:
                self._skip(path, str(exc))
                continue
            if instance.service != service:
                self._skip(path, f"registers service {instance.service!r}, not {service!r} of its directory")
                continue
            self.skipped.pop(str(path), None)
            found.append(instance)
        return found

    def _skip(self, path: Path, why: str) -> None:
        self.skipped[str(path)] = why
        if (str(path), why) not in self._warned:
            self._warned.add((str(path), why))
            log.warning("registry file skipped: it is no registration", extra={"path": str(path), "error": why})

    def services_now(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and valid_name(p.name))

    async def register(self, instance: ServiceInstance) -> None:
        await asyncio.to_thread(self.register_now, instance)

    async def deregister(self, instance: ServiceInstance) -> None:
        await asyncio.to_thread(self.deregister_now, instance)

    async def instances(self, service: str) -> list[ServiceInstance]:
        return await asyncio.to_thread(self.instances_now, service)

    async def renew(self, instance: ServiceInstance) -> bool:
        return await asyncio.to_thread(self.renew_now, instance)

    async def services(self) -> list[str]:
        return await asyncio.to_thread(self.services_now)

    async def close(self) -> None:
        return None


def _process_gone(pid: str) -> bool:
    """Whether no process of this host has the id `pid` (a zombie, killed but not yet reaped, counts as gone);
    False when `pid` is no process id."""
    if not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's process, alive
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Registration:
    """A running server's registration: made once it serves, renewed every `interval` while it is ready (the
    heartbeat of a registry that keeps one; written again if it was removed, say pruned while the server was
    unreachable) and removed first thing on a graceful stop, so that callers stop picking it while it drains.

    A registry that cannot be reached, or that refuses the writes (a read-only standby after a failover, a privilege
    revoked), never stops the server: the registration is retried at every interval, and the log says once that
    the registry is away or failing (again if it fails otherwise) and once that it is back."""

    def __init__(self, registry: ServiceRegistry, instances: Sequence[ServiceInstance], *,
                 ready: Callable[[], bool | None], interval: float, location: str = "") -> None:
        self.registry = registry
        self.instances = tuple(instances)
        self.ready = ready
        self.interval = interval
        self.location = location
        self._registered: set[str] = set()
        self._trouble: str | None = None  # why the last renewal failed, None if it did not
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            for instance in self.instances:
                await self.registry.register(instance)
                self._registered.add(instance.id)
                self._log_registered(instance, "registered")
        except Exception as exc:
            self._failed(exc)
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="registration")

    def _log_registered(self, instance: ServiceInstance, message: str) -> None:
        log.info(message, extra={"instance_id": instance.id, "address": instance.address,
                                 "weight": instance.weight, "registry": self.location})

    def _failed(self, exc: Exception) -> None:
        """Said once per outage: again only when the registry fails otherwise than it did."""
        away = isinstance(exc, UNAVAILABLE)
        trouble = "unreachable" if away else f"{type(exc).__name__}: {exc}"
        if trouble == self._trouble:
            return
        self._trouble = trouble
        if away:
            log.warning("registry unreachable: this instance keeps serving and registers once the registry is back",
                        extra={"registry": self.location, "error": str(exc)})
        else:  # a read-only standby after a failover, a privilege revoked, a readiness check that raised
            log.error("registration renewal failed: this instance keeps serving and tries again at every interval",
                      exc_info=exc, extra={"registry": self.location, "error": str(exc)})

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if not self.ready():
                    continue
                for instance in self.instances:
                    if await self.registry.renew(instance):
                        if instance.id in self._registered:
                            log.warning("registered again: the registration had been removed",
                                        extra={"instance_id": instance.id, "registry": self.location})
                        else:
                            self._registered.add(instance.id)
                            self._log_registered(instance, "registered")
            except Exception as exc:
                self._failed(exc)
            else:
                if self._trouble is not None:
                    log.info("registry reachable again" if self._trouble == "unreachable"
                             else "registration renewed again", extra={"registry": self.location})
                    self._trouble = None

    async def stop(self) -> None:
        try:
            await cancel(self._task)
        except Exception:  # the renewals ended by a defect: deregistering matters all the more
            log.exception("registration renewals had stopped", extra={"registry": self.location})
        self._task = None
        try:
            for instance in self.instances:
                try:
                    await self.registry.deregister(instance)
                except Exception as exc:
                    log.warning("deregistration failed: the registration is dropped once stale or failing checks",
                                extra={"instance_id": instance.id, "registry": self.location, "error": str(exc)})
                else:
                    log.info("deregistered", extra={"instance_id": instance.id, "registry": self.location})
        finally:
            await self.registry.close()
