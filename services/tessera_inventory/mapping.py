"""The one place where inventory protos and the inventory domain meet: requests in, resources and events out."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_events_pb2 as events_pb2
from tessera.inventory.v1 import product_pb2

from tessera_inventory.domain.model import (
    Money,
    Product,
    Reservation,
    ReservationItem,
    ReservationStatus,
    StockReleaseReason,
)

_STATUS_TO_PROTO = {
    ReservationStatus.ACTIVE: product_pb2.RESERVATION_STATUS_ACTIVE,
    ReservationStatus.COMMITTED: product_pb2.RESERVATION_STATUS_COMMITTED,
    ReservationStatus.RELEASED: product_pb2.RESERVATION_STATUS_RELEASED,
    ReservationStatus.EXPIRED: product_pb2.RESERVATION_STATUS_EXPIRED,
}
_RELEASE_REASON_TO_PROTO = {
    StockReleaseReason.REQUESTED: events_pb2.STOCK_RELEASE_REASON_REQUESTED,
    StockReleaseReason.EXPIRED: events_pb2.STOCK_RELEASE_REASON_EXPIRED,
    StockReleaseReason.RETURNED: events_pb2.STOCK_RELEASE_REASON_RETURNED,
}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def status_name(status: ReservationStatus) -> str:
    """The ReservationStatus enum name, as ErrorInfo metadata "status" gives it."""
    return product_pb2.ReservationStatus.Name(_STATUS_TO_PROTO[status])


def money_from_proto(m: money_pb2.Money) -> Money:
    return Money(currency_code=m.currency_code, amount_minor=m.amount_minor)


def money_to_proto(m: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=m.currency_code, amount_minor=m.amount_minor)


def items_from_proto(items) -> tuple[ReservationItem, ...]:
    # Ids in lower case, as the servicer takes every id (entrypoints.grpc_servicer._id).
    return tuple(ReservationItem(product_id=i.product_id.lower(), quantity=i.quantity) for i in items)


def product_to_proto(p: Product) -> product_pb2.Product:
    return product_pb2.Product(
        id=p.id, sku=p.sku, name=p.name, description=p.description, price=money_to_proto(p.price),
        stock_on_hand=p.stock_on_hand, stock_reserved=p.stock_reserved, stock_available=p.stock_available,
        create_time=timestamp(p.create_time), update_time=timestamp(p.update_time), version=p.version,
    )


def reservation_to_proto(r: Reservation) -> product_pb2.Reservation:
    message = product_pb2.Reservation(
        id=r.id, order_id=r.order_id,
        items=[product_pb2.ReservationItem(product_id=i.product_id, quantity=i.quantity) for i in r.items],
        status=_STATUS_TO_PROTO[r.status], expire_time=timestamp(r.expire_time),
        create_time=timestamp(r.create_time), update_time=timestamp(r.update_time),
    )
    if r.commit_time is not None:
        message.commit_time.CopyFrom(timestamp(r.commit_time))
    if r.release_time is not None:
        message.release_time.CopyFrom(timestamp(r.release_time))
    return message


def product_created(p: Product) -> events_pb2.ProductCreated:
    return events_pb2.ProductCreated(product=product_to_proto(p), occur_time=timestamp(p.create_time))


def product_updated(p: Product, paths: list[str]) -> events_pb2.ProductUpdated:
    return events_pb2.ProductUpdated(product=product_to_proto(p), changed_paths=paths,
                                     occur_time=timestamp(p.update_time))


def product_deleted(product_id: str, sku: str, when: dt.datetime) -> events_pb2.ProductDeleted:
    return events_pb2.ProductDeleted(product_id=product_id, sku=sku, occur_time=timestamp(when))


def stock_adjusted(p: Product, delta: int, reason: str, request_id: str) -> events_pb2.StockAdjusted:
    return events_pb2.StockAdjusted(
        product_id=p.id, sku=p.sku, delta=delta, reason=reason, stock_on_hand=p.stock_on_hand,
        stock_reserved=p.stock_reserved, stock_available=p.stock_available, request_id=request_id,
        occur_time=timestamp(p.update_time),
    )


def stock_reserved(r: Reservation) -> events_pb2.StockReserved:
    return events_pb2.StockReserved(reservation=reservation_to_proto(r), occur_time=timestamp(r.create_time))


def stock_released(r: Reservation, reason: StockReleaseReason, message: str) -> events_pb2.StockReleased:
    return events_pb2.StockReleased(reservation=reservation_to_proto(r), reason=_RELEASE_REASON_TO_PROTO[reason],
                                    message=message, occur_time=timestamp(r.update_time))


def reservation_committed(r: Reservation) -> events_pb2.ReservationCommitted:
    return events_pb2.ReservationCommitted(reservation=reservation_to_proto(r), occur_time=timestamp(r.update_time))
