"""Commands the order service handles: what a caller asks for, already translated from protobuf."""

from __future__ import annotations

import dataclasses

from tessera_order.domain.model import OrderStatus


@dataclasses.dataclass(frozen=True)
class OrderLine:
    product_id: str
    quantity: int


@dataclasses.dataclass(frozen=True)
class CreateOrder:
    customer_id: str
    items: tuple[OrderLine, ...]
    payment_method: str
    currency_code: str
    request_id: str


@dataclasses.dataclass(frozen=True)
class GetOrder:
    order_id: str


@dataclasses.dataclass(frozen=True)
class ListOrders:
    page_size: int
    page_token: str
    customer_id: str
    status: OrderStatus | None
    # A status value the contract does not define; refused rather than read as "every status".
    unknown_status: int | None = None


@dataclasses.dataclass(frozen=True)
class CancelOrder:
    order_id: str
    reason: str
