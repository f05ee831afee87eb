"""Commands the payment service handles: what a caller asks for, already translated from protobuf."""

from __future__ import annotations

import dataclasses

from tessera_payment.domain.model import Money, PaymentStatus


@dataclasses.dataclass(frozen=True)
class ProcessPayment:
    order_id: str
    customer_id: str
    amount: Money | None
    payment_method: str
    idempotency_key: str


@dataclasses.dataclass(frozen=True)
class VoidPayment:
    """The ProcessPayment request whose payment is voided."""

    order_id: str
    customer_id: str
    amount: Money | None
    payment_method: str
    idempotency_key: str


@dataclasses.dataclass(frozen=True)
class GetPayment:
    payment_id: str


@dataclasses.dataclass(frozen=True)
class ListPayments:
    page_size: int
    page_token: str
    order_id: str = ""
    customer_id: str = ""
    status: PaymentStatus | None = None
    # A status value the contract does not define; refused rather than read as "every status".
    unknown_status: int | None = None


@dataclasses.dataclass(frozen=True)
class RefundPayment:
    payment_id: str
    idempotency_key: str
    reason: str = ""
