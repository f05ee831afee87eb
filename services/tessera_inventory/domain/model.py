"""Products, their stock, and reservations: the inventory aggregates and the rules their fields obey."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re

from tessera_inventory import DOMAIN
from tessera_runtime.errors import NUL_REFUSED, Violations, has_nul, is_blank, is_one_line_text
from tessera_runtime.money import is_iso_currency

MAX_SKU = 64
MAX_NAME = 200
MAX_DESCRIPTION = 5000
MIN_PRICE = 1
MAX_PRICE = 10_000_000_000
MAX_STOCK = 1_000_000_000
MAX_DELTA = 1_000_000_000
MAX_ITEMS = 100
MAX_QUANTITY = 1_000_000
MAX_BATCH = 100
MAX_REQUEST_ID = 64
MAX_REASON = 500
DEFAULT_TTL = dt.timedelta(minutes=15)
MIN_TTL = dt.timedelta(minutes=1)
MAX_TTL = dt.timedelta(hours=24)

# Applied with fullmatch: with match, "$" also matches before a final line break.
_SKU = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Money:
    currency_code: str
    amount_minor: int


@dataclasses.dataclass
class Product:
    id: str
    sku: str
    name: str
    description: str
    price: Money
    stock_on_hand: int
    stock_reserved: int
    create_time: dt.datetime
    update_time: dt.datetime
    version: int = 1

    @property
    def stock_available(self) -> int:
        return self.stock_on_hand - self.stock_reserved


class ReservationStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class StockReleaseReason(enum.Enum):
    REQUESTED = "REQUESTED"
    EXPIRED = "EXPIRED"
    RETURNED = "RETURNED"


@dataclasses.dataclass(frozen=True)
class ReservationItem:
    product_id: str
    quantity: int


@dataclasses.dataclass
class Reservation:
    id: str
    order_id: str
    items: tuple[ReservationItem, ...]
    status: ReservationStatus
    expire_time: dt.datetime
    create_time: dt.datetime
    update_time: dt.datetime
    commit_time: dt.datetime | None = None
    release_time: dt.datetime | None = None

    def has_items(self, items: tuple[ReservationItem, ...]) -> bool:
        """Same products and quantities, in any order: what makes a ReserveStock repeat a repeat."""
        return sorted((i.product_id, i.quantity) for i in self.items) == sorted(
            (i.product_id, i.quantity) for i in items)

    def is_due(self, now: dt.datetime) -> bool:
        """An ACTIVE reservation whose time is up: it must expire instead of being committed."""
        return self.status is ReservationStatus.ACTIVE and self.expire_time <= now

    def commit(self, now: dt.datetime) -> None:
        self._require(ReservationStatus.ACTIVE)
        self.status = ReservationStatus.COMMITTED
        self.commit_time = now
        self.update_time = now

    def release(self, now: dt.datetime) -> StockReleaseReason:
        """Gives the units back; a committed reservation's units go back on hand, an active one's become available."""
        reason = (StockReleaseReason.RETURNED if self.status is ReservationStatus.COMMITTED
                  else StockReleaseReason.REQUESTED)
        if self.status not in (ReservationStatus.ACTIVE, ReservationStatus.COMMITTED):
            raise ValueError(f"cannot release a {self.status.value} reservation")
        self.status = ReservationStatus.RELEASED
        self.release_time = now
        self.update_time = now
        return reason

    def expire(self, now: dt.datetime) -> None:
        self._require(ReservationStatus.ACTIVE)
        self.status = ReservationStatus.EXPIRED
        self.release_time = now
        self.update_time = now

    def _require(self, status: ReservationStatus) -> None:
        if self.status is not status:
            raise ValueError(f"reservation is {self.status.value}, not {status.value}")


@dataclasses.dataclass(frozen=True)
class StockShortage:
    """A product with fewer available units than a reservation asked for."""

    product_id: str
    sku: str
    requested: int
    available: int


def new_violations() -> Violations:
    return Violations(DOMAIN)


def check_key(value: str, field: str, v: Violations, limit: int = MAX_REQUEST_ID) -> None:
    """An idempotency key: required, short, printable."""
    if not value:
        v.add(field, "is required")
    elif len(value) > limit or not value.isprintable():
        v.add(field, f"must be 1 to {limit} printable characters")


def check_sku(sku: str, field: str, v: Violations) -> None:
    if not sku:
        v.add(field, "is required")
    elif len(sku) > MAX_SKU or not _SKU.fullmatch(sku):
        v.add(field, f"must be 1 to {MAX_SKU} characters from A-Z, a-z, 0-9, '-', '_' and '.'")


def check_name(name: str, field: str, v: Violations) -> None:
    if is_blank(name):
        v.add(field, "is required")
    elif len(name) > MAX_NAME:
        v.add(field, f"must be at most {MAX_NAME} characters")
    elif not is_one_line_text(name):
        v.add(field, "must not contain control characters or line breaks")


def check_description(description: str, field: str, v: Violations) -> None:
    if len(description) > MAX_DESCRIPTION:
        v.add(field, f"must be at most {MAX_DESCRIPTION} characters")
    elif has_nul(description):
        v.add(field, NUL_REFUSED)


def check_currency(code: str, field: str, v: Violations) -> None:
    if not code:
        v.add(field, "is required")
    elif not is_iso_currency(code):
        v.add(field, "must be an ISO 4217 currency code in upper case, such as EUR")


def check_price_amount(amount: int, field: str, v: Violations) -> None:
    if not MIN_PRICE <= amount <= MAX_PRICE:
        v.add(field, f"must be between {MIN_PRICE} and {MAX_PRICE:,}")


def check_price(price: Money | None, field: str, v: Violations) -> None:
    if price is None:
        v.add(field, "is required")
        return
    check_currency(price.currency_code, f"{field}.currency_code", v)
    check_price_amount(price.amount_minor, f"{field}.amount_minor", v)


def check_reason(reason: str, field: str, v: Violations, *, required: bool) -> None:
    if len(reason) > MAX_REASON:
        v.add(field, f"must be at most {MAX_REASON} characters")
    elif has_nul(reason):
        v.add(field, NUL_REFUSED)
    elif required and not reason.strip():
        v.add(field, "is required")
