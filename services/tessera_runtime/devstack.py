"""`make run`: starts every Tessera service on embedded defaults, waits until each is ready, prints where."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_runtime.config import ROOT

# Local ports of `make run`. Kubernetes uses the same gRPC ports, so addresses read the same everywhere.
PORTS = {
    "user": 50051, "inventory": 50052, "payment": 50053, "order": 50054, "notification": 50055, "analytics": 50056,
}
METRICS_PORTS = {name: 9100 + i for i, name in enumerate(PORTS, start=1)}

# Modules that add components (the gateway, ...): each exposes `components(stack: DevStack) -> list[Component]`.
EXTENSIONS = ("tessera_graphql.devstack", "tessera_gateway.devstack")


@dataclasses.dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    describe: list[str]
    process: subprocess.Popen | None = None


def grpc_ready(address: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    return check


class DevStack:
    def __init__(self) -> None:
        self.data_dir = Path(os.environ.get("TESSERA_DATA_DIR", ROOT / "data"))
        self.log_dir = self.data_dir / "logs"
        self.components: list[Component] = []

    def service_addresses(self) -> dict[str, str]:
        return {c.name: f"127.0.0.1:{PORTS[c.name]}" for c in self.components if c.name in PORTS}

    def dependency_address(self, name: str) -> str:
        """How a service or the GraphQL API of the stack addresses `name`: its fixed port, or through the registry
        when TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL is set (every service registers there, and further
        instances started by hand with the same registry share the calls by their TESSERA_INSTANCE_WEIGHT)."""
        if os.environ.get("TESSERA_REGISTRY_DIR") or os.environ.get("TESSERA_REGISTRY_URL"):
            return f"registry:///{name}"
        return f"127.0.0.1:{PORTS[name]}"

    def add_services(self) -> None:
        for name, port in PORTS.items():
            if importlib.util.find_spec(f"tessera_{name}") is None:
                continue
            env = {
                "TESSERA_GRPC_PORT": str(port),
                "TESSERA_METRICS_PORT": str(METRICS_PORTS[name]),
                "TESSERA_DATA_DIR": str(self.data_dir),
                **{f"TESSERA_{other.upper()}_SERVICE_ADDR": self.dependency_address(other) for other in PORTS},
            }
            self.components.append(Component(
                name=name, argv=[sys.executable, "-m", "tessera_runtime.cli", "serve", name], env=env,
                ready=grpc_ready(f"127.0.0.1:{port}"),
                describe=[f"{name:<13} gRPC 127.0.0.1:{port}   metrics http://127.0.0.1:{METRICS_PORTS[name]}/metrics"],
            ))

    def add_extensions(self) -> None:
        for module_name in EXTENSIONS:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    continue
                raise
            self.components.extend(module.components(self))

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for c in self.components:
            log = open(self.log_dir / f"{c.name}.log", "ab")
            c.process = subprocess.Popen(c.argv, env={**os.environ, **c.env}, stdout=log, stderr=log,
                                         cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0, stopping: Callable[[], bool] = lambda: False) -> list[str]:
        """Waits until every component is ready; returns what went wrong (nothing when all are ready or when
        `stopping` turned true, which is checked between every two readiness checks)."""
        deadline = time.monotonic() + timeout
        pending = list(self.components)
        while pending and time.monotonic() < deadline:
            for c in list(pending):
                if stopping():
                    return []
                if self.exited(c):
                    return [self.death(c)]
                if c.ready():
                    pending.remove(c)
            time.sleep(0.2)
        if stopping():
            return []
        return [f"{c.name} not ready after {timeout:.0f}s" for c in pending]

    @staticmethod
    def exited(c: Component) -> bool:
        return c.process is not None and c.process.poll() is not None

    def death(self, c: Component) -> str:
        assert c.process is not None
        code = c.process.returncode
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"{c.name} (pid {c.process.pid}) {how}; see {self.log_dir / (c.name + '.log')}"

    def stop(self) -> None:
        for c in reversed(self.components):
            if c.process is not None and c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)
        for c in self.components:
            if c.process is not None:
                try:
                    c.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    c.process.kill()
                    c.process.wait()


def main() -> int:
    stack = DevStack()
    stack.add_services()
    stack.add_extensions()
    return run(stack)


def run(stack: DevStack) -> int:
    """Starts the stack and supervises it until Ctrl-C / SIGTERM (exit 0) or until a component dies: then it stops
    the others and exits 1, naming the component and its exit code."""
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        problems = [] if stop else stack.wait_ready(stopping=lambda: stop)
        if problems:
            print("Tessera did not start:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        if stop:
            print("Stopped while starting.", file=sys.stderr)
            return 0
        user = stack.service_addresses().get("user", "127.0.0.1:50051")
        print("\nTessera is running (SQLite data and logs under " + str(stack.data_dir) + "):\n")
        for c in stack.components:
            for line in c.describe:
                print("  " + line)
        print(f"""
Try it:
  {ROOT / '.venv/bin/grpcurl'} -plaintext {user} list
  {ROOT / '.venv/bin/grpcurl'} -plaintext \\
      -d '{{"user":{{"email":"ada@example.com","display_name":"Ada"}},"request_id":"demo-1"}}' \\
      {user} tessera.user.v1.UserService/CreateUser

Ctrl-C stops everything.""", flush=True)
        while not stop:
            dead = [c for c in stack.components if stack.exited(c)]
            if dead:
                print("Tessera stopped: " + "; ".join(stack.death(c) for c in dead) + ". Stopping the others.",
                      file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
