"""The payment service as a process: grpcurl against it, and a SIGKILL in the middle of a charge, after which the
restarted service settles the payment it left PENDING, without charging."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
from tessera.payment.v1 import payment_service_pb2_grpc

from tests.integration.conftest_payment import payment_request
from tests.support.processes import ServiceProcess
from tests.support.waiting import wait_for

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SERVICE = "tessera.payment.v1.PaymentService"


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def row(db: Path, payment_filter: str, *params: str) -> tuple | None:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT id, status, attempts, failure_message FROM payments WHERE {payment_filter}",
                            params).fetchone()


def test_grpcurl_and_a_charge_killed_midway_is_settled_after_restart(tmp_path):
    env = {"TESSERA_DATA_DIR": str(tmp_path), "TESSERA_OUTBOX_RELAY": "false",
           "TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "2",
           "TESSERA_PAYMENT_LEASE_GRACE_SECONDS": "0.2", "TESSERA_PAYMENT_RECOVERY_SECONDS": "0.1"}
    db = tmp_path / "payment.db"
    first = ServiceProcess("payment", env, tmp_path / "payment-1.log").start()
    try:
        address = first.address
        assert SERVICE in grpcurl(address, "list").stdout.split()
        body = {"order_id": str(uuid.uuid4()), "customer_id": str(uuid.uuid4()),
                "amount": {"currency_code": "EUR", "amount_minor": "2500"}, "payment_method": "pm_sandbox_ok",
                "idempotency_key": "grpcurl-1"}
        paid = grpcurl("-d", json.dumps(body), address, f"{SERVICE}/ProcessPayment")
        assert paid.returncode == 0, paid.stderr
        assert json.loads(paid.stdout)["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED"
        declined = grpcurl("-d", json.dumps({**body, "payment_method": "pm_sandbox_declined",
                                             "idempotency_key": "grpcurl-2"}), address, f"{SERVICE}/ProcessPayment")
        assert declined.returncode == 64 + grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "PAYMENT_DECLINED" in declined.stderr

        request = payment_request("pm_sandbox_timeout")
        channel = grpc.insecure_channel(address)
        pending_call = payment_service_pb2_grpc.PaymentServiceStub(channel).ProcessPayment.future(request)
        wait_for(lambda: row(db, "order_id = ? AND status = 'PENDING' AND attempts = 1", request.order_id))
        first.kill()  # SIGKILL while the processor is being asked
        channel.close()
        assert pending_call.exception() is not None
    finally:
        first.kill()
    assert row(db, "order_id = ?", request.order_id)[1] == "PENDING"  # the evidence the crash left

    second = ServiceProcess("payment", env, tmp_path / "payment-2.log").start()
    try:
        settled = wait_for(lambda: (r := row(db, "order_id = ?", request.order_id)) and r[1] != "PENDING" and r)
        assert settled[1:3] == ("FAILED", 1) and "interrupted" in settled[3]
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM sandbox_charges WHERE charge_key = ?",
                                (settled[0],)).fetchone()[0] == 0
        assert second.terminate() == 0
    finally:
        second.kill()
