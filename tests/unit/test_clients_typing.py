"""The Python client is typed: mypy accepts the package and its example and rejects a call with the wrong message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"

MISUSE = '''
from tessera.order.v1 import order_service_pb2 as order_api
from tessera.user.v1 import user_service_pb2 as user_api
from tessera_client import aio_connect, connect

with connect("127.0.0.1:1") as tessera:
    reply = tessera.users.GetUser(user_api.GetUserRequest(id="x"))
    reveal_type(reply)
    tessera.users.GetUser(user_api.CreateUserRequest())

async def main() -> None:
    async with aio_connect("127.0.0.1:1") as tessera:
        order = await tessera.orders.GetOrder(order_api.GetOrderRequest(id="x"))
        reveal_type(order)
        await tessera.orders.GetOrder(user_api.GetUserRequest())
'''


def mypy(*paths: Path) -> subprocess.CompletedProcess[str]:
    # google.rpc (googleapis-common-protos) ships no type information; everything else is checked.
    env = {**os.environ, "MYPYPATH": f"{ROOT / 'gen' / 'python'}{os.pathsep}{CLIENT}"}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull, "--strict-equality",
         "--warn-unused-ignores", "--disallow-untyped-defs", "--allow-untyped-calls", "--ignore-missing-imports",
         *map(str, paths)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)


def test_client_package_and_example_type_check():
    result = mypy(CLIENT / "tessera_client", CLIENT / "examples" / "quickstart.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_type_requests_and_responses_on_sync_and_asyncio_channels(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    result = mypy(misuse)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert 'Revealed type is "tessera.user.v1.user_service_pb2.GetUserResponse"' in out
    assert 'Revealed type is "tessera.order.v1.order_service_pb2.GetOrderResponse"' in out
    assert 'incompatible type "CreateUserRequest"; expected "GetUserRequest"' in out
    assert 'incompatible type "GetUserRequest"; expected "GetOrderRequest"' in out
    assert out.count("error:") == 2, out
