"""The inventory service as a process: grpcurl against it, the sweeper at work, a clean exit on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from tests.support.processes import ServiceProcess

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SERVICE = "tessera.inventory.v1.InventoryService"


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def call(address: str, method: str, body: dict) -> dict:
    result = grpcurl("-d", json.dumps(body), address, f"{SERVICE}/{method}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_grpcurl_reservation_expiry_and_sigterm(tmp_path):
    service = ServiceProcess("inventory", {
        "TESSERA_DATA_DIR": str(tmp_path), "TESSERA_OUTBOX_RELAY": "false",
        "TESSERA_RESERVATION_DEFAULT_TTL_SECONDS": "0.5", "TESSERA_RESERVATION_SWEEP_SECONDS": "0.1"},
        tmp_path / "inventory.log").start()
    try:
        address = service.address
        listed = grpcurl(address, "list")
        assert listed.returncode == 0, listed.stderr
        assert SERVICE in listed.stdout.split()
        product = call(address, "CreateProduct", {
            "product": {"sku": "LAMP-1", "name": "Lamp", "price": {"currency_code": "EUR", "amount_minor": "1999"},
                        "stock_on_hand": "4"},
            "request_id": "create-lamp"})["product"]
        reservation = call(address, "ReserveStock", {
            "order_id": str(uuid.uuid4()), "items": [{"product_id": product["id"], "quantity": "3"}]})["reservation"]
        assert reservation["status"] == "RESERVATION_STATUS_ACTIVE"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = call(address, "GetReservation", {"id": reservation["id"]})["reservation"]
            if got["status"] != "RESERVATION_STATUS_ACTIVE":
                break
            time.sleep(0.1)
        assert got["status"] == "RESERVATION_STATUS_EXPIRED"
        after = call(address, "GetProduct", {"id": product["id"]})["product"]
        assert after["stock_available"] == "4" and "stock_reserved" not in after
        short = grpcurl("-d", json.dumps({"order_id": str(uuid.uuid4()),
                                          "items": [{"product_id": product["id"], "quantity": "5"}]}),
                        address, f"{SERVICE}/ReserveStock")
        assert short.returncode == 64 + grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "INSUFFICIENT_STOCK" in short.stderr
        assert service.terminate() == 0  # the sweeper stops with the server
    finally:
        service.kill()
