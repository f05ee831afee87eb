"""Commands the inventory service handles: what a caller asks for, already translated from protobuf."""

from __future__ import annotations

import dataclasses
import datetime as dt

from tessera_inventory.domain.model import Money, ReservationItem


@dataclasses.dataclass(frozen=True)
class CreateProduct:
    sku: str
    name: str
    description: str
    price: Money | None
    stock_on_hand: int
    request_id: str
    # Output-only fields the caller filled in; refused rather than silently ignored.
    output_only_set: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GetProduct:
    product_id: str


@dataclasses.dataclass(frozen=True)
class BatchGetProducts:
    product_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ListProducts:
    page_size: int
    page_token: str
    sku: str = ""
    in_stock_only: bool = False


@dataclasses.dataclass(frozen=True)
class UpdateProduct:
    product_id: str
    paths: tuple[str, ...]
    name: str = ""
    description: str = ""
    price: Money | None = None


@dataclasses.dataclass(frozen=True)
class DeleteProduct:
    product_id: str


@dataclasses.dataclass(frozen=True)
class AdjustStock:
    product_id: str
    delta: int
    reason: str
    request_id: str


@dataclasses.dataclass(frozen=True)
class ReserveStock:
    order_id: str
    items: tuple[ReservationItem, ...]
    # None when the caller left it unset or zero: the service's default applies.
    ttl: dt.timedelta | None = None


@dataclasses.dataclass(frozen=True)
class GetReservation:
    reservation_id: str


@dataclasses.dataclass(frozen=True)
class ReleaseReservation:
    reservation_id: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class CommitReservation:
    reservation_id: str
