"""The one place where order protos and the order domain meet: resources and events out, filters in."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from tessera.common.v1 import money_pb2
from tessera.order.v1 import order_events_pb2 as events_pb2
from tessera.order.v1 import order_pb2

from tessera_order.domain.model import STEPS, Failure, Order, OrderItem, OrderStatus, SagaStep, StepName

_STATUS_TO_PROTO = {s: order_pb2.OrderStatus.Value(f"ORDER_STATUS_{s.value}") for s in OrderStatus}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def money(amount_minor: int, currency_code: str) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor)


def status_from_proto(value: int) -> OrderStatus | None:
    return _STATUS_FROM_PROTO.get(value)


def status_name(status: OrderStatus) -> str:
    return order_pb2.OrderStatus.Name(_STATUS_TO_PROTO[status])


def step_to_proto(step: StepName) -> int:
    return order_pb2.SagaStepName.Value(f"SAGA_STEP_NAME_{step.value}")


def item_to_proto(item: OrderItem, currency_code: str) -> order_pb2.OrderItem:
    return order_pb2.OrderItem(
        product_id=item.product_id, product_name=item.product_name, sku=item.sku, quantity=item.quantity,
        unit_price=money(item.unit_price_minor, currency_code),
        line_total=money(item.line_total_minor, currency_code),
    )


def failure_to_proto(failure: Failure) -> order_pb2.OrderFailure:
    return order_pb2.OrderFailure(reason=failure.reason, message=failure.message, step=step_to_proto(failure.step),
                                  metadata=dict(failure.metadata))


def saga_step_to_proto(step: SagaStep) -> order_pb2.SagaStep:
    proto = order_pb2.SagaStep(
        name=step_to_proto(step.name),
        status=order_pb2.SagaStepStatus.Value(f"SAGA_STEP_STATUS_{step.status.value}"),
        attempts=step.shown_attempts, error=step.error,
    )
    if step.update_time is not None:
        proto.update_time.CopyFrom(timestamp(step.update_time))
    return proto


def _items(order: Order) -> list[order_pb2.OrderItem]:
    return [item_to_proto(i, order.currency_code) for i in order.items]


def _saga(order: Order) -> list[order_pb2.SagaStep]:
    return [saga_step_to_proto(order.steps[name]) for name in STEPS]


def order_to_proto(order: Order) -> order_pb2.Order:
    proto = order_pb2.Order(
        id=order.id, customer_id=order.customer_id, items=_items(order),
        total=money(order.total_minor, order.currency_code), status=_STATUS_TO_PROTO[order.status],
        payment_id=order.payment_id, reservation_id=order.reservation_id, saga=_saga(order),
        request_id=order.request_id, cancel_reason=order.cancel_reason,
        create_time=timestamp(order.create_time), update_time=timestamp(order.update_time),
        version=order.version,
    )
    if order.failure is not None:
        proto.failure.CopyFrom(failure_to_proto(order.failure))
    if order.confirm_time is not None:
        proto.confirm_time.CopyFrom(timestamp(order.confirm_time))
    if order.cancel_time is not None:
        proto.cancel_time.CopyFrom(timestamp(order.cancel_time))
    return proto


def order_created(order: Order) -> events_pb2.OrderCreated:
    return events_pb2.OrderCreated(order=order_to_proto(order), occur_time=timestamp(order.create_time))


def order_confirmed(order: Order) -> events_pb2.OrderConfirmed:
    assert order.confirm_time is not None
    return events_pb2.OrderConfirmed(
        order_id=order.id, customer_id=order.customer_id, items=_items(order),
        total=money(order.total_minor, order.currency_code), payment_id=order.payment_id,
        reservation_id=order.reservation_id, create_time=timestamp(order.create_time),
        occur_time=timestamp(order.confirm_time),
    )


def order_failed(order: Order) -> events_pb2.OrderFailed:
    assert order.failure is not None
    return events_pb2.OrderFailed(
        order_id=order.id, customer_id=order.customer_id, items=_items(order),
        total=money(order.total_minor, order.currency_code), failure=failure_to_proto(order.failure),
        refunded_payment_id=order.refunded_payment_id, create_time=timestamp(order.create_time),
        occur_time=timestamp(order.update_time),
    )


def order_cancelled(order: Order) -> events_pb2.OrderCancelled:
    assert order.cancel_time is not None
    return events_pb2.OrderCancelled(
        order_id=order.id, customer_id=order.customer_id, items=_items(order),
        refunded_amount=money(order.total_minor, order.currency_code), payment_id=order.payment_id,
        reason=order.cancel_reason, create_time=timestamp(order.create_time),
        occur_time=timestamp(order.cancel_time),
    )


def order_compensation_failed(order: Order, step: SagaStep) -> events_pb2.OrderCompensationFailed:
    event = events_pb2.OrderCompensationFailed(
        order_id=order.id, customer_id=order.customer_id, step=step_to_proto(step.name), error=step.error,
        cancel_reason=order.cancel_reason if order.cancellation else "", payment_id=order.payment_id,
        reservation_id=order.reservation_id, saga=_saga(order), occur_time=timestamp(order.update_time),
    )
    if order.failure is not None:
        event.failure.CopyFrom(failure_to_proto(order.failure))
    return event
