"""Starts the Tessera services and the gateway the Node suite calls, runs a command against them, stops them.

    .venv/bin/python clients/ts/test/stack.py -- node --test clients/ts/gen/build/test/*.test.js

Every service runs as its own process on an ephemeral port with SQLite files in a temporary folder and its own
RabbitMQ vhost, so the run touches nothing else on the machine. The command gets their addresses in the
environment (TESSERA_<NAME>_ADDR, TESSERA_GATEWAY_URL, TESSERA_ADMIN_TOKEN, ...; `stack.py mint` makes more
tokens) and its exit code is this script's. Each process is
stopped by its PID, also when the command fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import rabbitmq  # noqa: E402
from tests.support.gateway import SERVICES, Gateway, closed_port  # noqa: E402
from tests.support.processes import ServiceProcess  # noqa: E402

# Order calls the other three; they start first, in parallel, with analytics (it calls no one: it counts the
# events the others publish on the run's vhost).
DEPENDENCIES = ("user", "inventory", "payment")
INDEPENDENT = ("analytics",)


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL of a fresh vhost on the machine's RabbitMQ, deleted with everything in it afterwards."""
    vhost = rabbitmq.create_vhost("tessera-clients")
    try:
        yield rabbitmq.amqp_url(vhost)
    finally:
        rabbitmq.delete_vhost(vhost)


def mint(keys: Path, subject: str, scopes: list[str]) -> str:
    """A token of the dev profile's issuer and audience, signed with the key in `keys` (Gateway.keys_dir): what
    Gateway.mint makes, for the Node suite, which holds no Gateway object."""
    from tessera_gateway import description, tokens

    jwt = description.load("dev").jwt
    return tokens.mint(tokens.ensure_keys(keys), subject=subject, scopes=scopes, issuer=jwt.issuer,
                       audience=jwt.audiences[0], ttl_seconds=600)


class Stack:
    def __init__(self, workdir: Path, amqp_url: str) -> None:
        self.workdir = workdir
        self.common = {
            "TESSERA_ENV": "test",
            "TESSERA_DATA_DIR": str(workdir),
            "TESSERA_AMQP_URL": amqp_url,
            "TESSERA_LOG_LEVEL": "WARNING",
        }
        self.processes: dict[str, ServiceProcess] = {}
        self.gateway: Gateway | None = None
        self._dead = closed_port()

    def _start(self, name: str, env: dict[str, str]) -> ServiceProcess:
        process = ServiceProcess(name, {**self.common, **env}, self.workdir / f"{name}.log")
        self.processes[name] = process
        return process.start(timeout=60)

    def start(self, with_gateway: bool) -> None:
        with ThreadPoolExecutor(len(DEPENDENCIES) + len(INDEPENDENT)) as pool:
            for future in [pool.submit(self._start, name, {}) for name in (*DEPENDENCIES, *INDEPENDENT)]:
                future.result()
        self._start("order", {
            f"TESSERA_{name.upper()}_SERVICE_ADDR": self.processes[name].address for name in DEPENDENCIES
        })
        if with_gateway:
            # Services the suite does not start (notification) are routed to a port that refuses connections.
            upstreams = {name: f"127.0.0.1:{self._dead.getsockname()[1]}" for name in SERVICES}
            upstreams.update(self.addresses())
            self.gateway = Gateway(self.workdir, "gateway", upstreams).start(sorted(self.processes))

    def addresses(self) -> dict[str, str]:
        return {name: p.address for name, p in self.processes.items()}

    def environment(self) -> dict[str, str]:
        env = {f"TESSERA_{name.upper()}_ADDR": address for name, address in self.addresses().items()}
        env["TESSERA_PYTHON"] = sys.executable
        env["TESSERA_ROOT"] = str(ROOT)
        if self.gateway is not None:
            env["TESSERA_GATEWAY_ADDR"] = self.gateway.address
            env["TESSERA_GATEWAY_URL"] = f"http://{self.gateway.address}"
            env["TESSERA_GATEWAY_KEYS"] = str(self.gateway.keys_dir)
            env["TESSERA_ADMIN_TOKEN"] = self.gateway.mint("clients-suite-admin", ["admin"])
        return env

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for process in reversed(list(self.processes.values())):
            process.stop()
        self._dead.close()

    def logs(self) -> str:
        tails = [f"--- {name}.log (tail)\n{p.log_text()[-2000:]}" for name, p in self.processes.items()]
        if self.gateway is not None:
            tails.append(f"--- gateway.log (tail)\n{self.gateway.envoy.log_text()[-2000:]}")
        return "\n".join(tails)


def mint_main(argv: list[str]) -> int:
    """`stack.py mint --keys DIR --sub ID --scope "a b"`: prints a token for the gateway of a running suite."""
    parser = argparse.ArgumentParser(prog="stack.py mint")
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--sub", required=True)
    parser.add_argument("--scope", default="")
    args = parser.parse_args(argv)
    print(mint(args.keys, args.sub, args.scope.split()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mint"]:
        return mint_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-gateway", action="store_true", help="start the services only")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with tempfile.TemporaryDirectory(prefix="tessera-clients-") as tmp, private_vhost() as amqp_url:
        stack = Stack(Path(tmp), amqp_url)
        try:
            stack.start(with_gateway=not args.no_gateway)
            code = subprocess.run(command, env={**os.environ, **stack.environment()}, cwd=ROOT).returncode
        finally:
            stack.stop()
        if code != 0:
            print(stack.logs(), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
