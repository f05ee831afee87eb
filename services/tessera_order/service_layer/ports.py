"""What the order service needs from the user, inventory and payment services, independent of gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc

# Statuses after which the other service may have acted although the call failed.
_OUTCOME_UNKNOWN_CODES = frozenset({
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
})
# Statuses worth trying again after a pause.
_TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
})


class DownstreamError(Exception):
    """A call to another service failed. Keeps that service's status, ErrorInfo reason and metadata.

    `answered` is True when the other service itself refused the call with an ErrorInfo (it decided; nothing
    was done unless its contract says otherwise); False when the call died in transit or timed out, so the
    other service may or may not have acted."""

    def __init__(self, service: str, code: grpc.StatusCode, reason: str, message: str,
                 metadata: Mapping[str, str] | None = None, *, answered: bool = False) -> None:
        super().__init__(f"{service}: {code.name} {reason}: {message}")
        self.service = service
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.answered = answered and code not in _OUTCOME_UNKNOWN_CODES

    @property
    def transient(self) -> bool:
        return self.code in _TRANSIENT_CODES

    @property
    def outcome_unknown(self) -> bool:
        return not self.answered

    def describe(self) -> str:
        """The step error text: "REASON: message"."""
        return f"{self.reason}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Customer:
    id: str
    active: bool


@dataclasses.dataclass(frozen=True)
class Product:
    id: str
    name: str
    sku: str
    price_minor: int
    currency_code: str


@dataclasses.dataclass(frozen=True)
class Reservation:
    id: str
    status: str  # ReservationStatus name without prefix: ACTIVE, COMMITTED, RELEASED, EXPIRED


@dataclasses.dataclass(frozen=True)
class Payment:
    id: str
    status: str  # PaymentStatus name without prefix: PENDING, SUCCEEDED, DECLINED, FAILED, REFUNDED, VOIDED
    idempotency_key: str


class CustomerDirectory(Protocol):
    async def get_customer(self, customer_id: str) -> Customer: ...


class Inventory(Protocol):
    async def batch_get_products(self, product_ids: Sequence[str]) -> list[Product]: ...

    async def reserve_stock(self, order_id: str, items: Sequence[tuple[str, int]],
                            ttl_seconds: int) -> Reservation: ...

    async def commit_reservation(self, reservation_id: str) -> Reservation: ...

    async def release_reservation(self, reservation_id: str, reason: str) -> Reservation: ...


class Payments(Protocol):
    async def process_payment(self, *, order_id: str, customer_id: str, amount_minor: int, currency_code: str,
                              payment_method: str, idempotency_key: str) -> Payment: ...

    async def refund_payment(self, payment_id: str, idempotency_key: str, reason: str) -> Payment: ...

    async def void_payment(self, *, order_id: str, customer_id: str, amount_minor: int, currency_code: str,
                           payment_method: str, idempotency_key: str) -> Payment: ...


@dataclasses.dataclass(frozen=True)
class Downstream:
    """The other services the saga talks to."""

    users: CustomerDirectory
    inventory: Inventory
    payments: Payments
