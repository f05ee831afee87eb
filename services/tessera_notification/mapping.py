"""The one place where protobuf and the notification domain meet: events in, resources and events out."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from tessera.common.v1 import money_pb2
from tessera.notification.v1 import notification_events_pb2 as events_pb2
from tessera.notification.v1 import notification_pb2
from tessera.order.v1 import order_events_pb2, order_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2, user_pb2

from tessera_notification.domain.content import (
    Cancellation,
    Line,
    OrderFacts,
    PlacementFailure,
    Receipt,
    Refund,
    Welcome,
)
from tessera_notification.domain.model import Notification, NotificationKind, NotificationStatus
from tessera_notification.domain.money import Money
from tessera_notification.service_layer import commands

_KIND_TO_PROTO = {k: notification_pb2.NotificationKind.Value(f"NOTIFICATION_KIND_{k.value}") for k in NotificationKind}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_STATUS_TO_PROTO = {s: notification_pb2.NotificationStatus.Value(f"NOTIFICATION_STATUS_{s.value}")
                    for s in NotificationStatus}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _time(ts: Timestamp, present: bool) -> dt.datetime | None:
    return ts.ToDatetime(tzinfo=dt.UTC) if present else None


def kind_from_proto(value: int) -> tuple[NotificationKind | None, int | None]:
    """(kind, None), (None, None) for UNSPECIFIED, or (None, value) for a number the contract does not define."""
    if value == notification_pb2.NOTIFICATION_KIND_UNSPECIFIED:
        return None, None
    kind = _KIND_FROM_PROTO.get(value)
    return (kind, None) if kind is not None else (None, value)


def status_from_proto(value: int) -> tuple[NotificationStatus | None, int | None]:
    if value == notification_pb2.NOTIFICATION_STATUS_UNSPECIFIED:
        return None, None
    status = _STATUS_FROM_PROTO.get(value)
    return (status, None) if status is not None else (None, value)


def notification_to_proto(n: Notification) -> notification_pb2.Notification:
    message = notification_pb2.Notification(
        id=n.id, user_id=n.user_id, recipient=n.recipient, kind=_KIND_TO_PROTO[n.kind],
        channel=notification_pb2.NOTIFICATION_CHANNEL_EMAIL, subject=n.subject, status=_STATUS_TO_PROTO[n.status],
        attempts=n.attempts, event_id=n.event_id, event_type=n.event_type, last_error=n.last_error,
        create_time=timestamp(n.create_time), update_time=timestamp(n.update_time), order_id=n.order_id,
        message_id=n.message_id,
    )
    if n.sent_time is not None:
        message.sent_time.CopyFrom(timestamp(n.sent_time))
    if n.next_attempt_time is not None:
        message.next_attempt_time.CopyFrom(timestamp(n.next_attempt_time))
    return message


def notification_sent(n: Notification) -> events_pb2.NotificationSent:
    assert n.sent_time is not None
    return events_pb2.NotificationSent(
        notification_id=n.id, user_id=n.user_id, recipient=n.recipient, kind=_KIND_TO_PROTO[n.kind],
        channel=notification_pb2.NOTIFICATION_CHANNEL_EMAIL, subject=n.subject, order_id=n.order_id,
        event_id=n.event_id, event_type=n.event_type, message_id=n.message_id, attempts=n.attempts,
        occur_time=timestamp(n.sent_time))


def notification_failed(n: Notification, when: dt.datetime) -> events_pb2.NotificationFailed:
    return events_pb2.NotificationFailed(
        notification_id=n.id, user_id=n.user_id, recipient=n.recipient, kind=_KIND_TO_PROTO[n.kind],
        channel=notification_pb2.NOTIFICATION_CHANNEL_EMAIL, status=_STATUS_TO_PROTO[n.status],
        order_id=n.order_id, event_id=n.event_id, event_type=n.event_type, attempts=n.attempts,
        last_error=n.last_error, occur_time=timestamp(when))


# -- events in -----------------------------------------------------------------------------------------------

def _user(u: user_pb2.User) -> commands.RecordUser:
    return commands.RecordUser(
        user_id=u.id, email=u.email, display_name=u.display_name, locale=u.profile.locale,
        # Preferences omitted from the event mean the contract's defaults (order e-mails on).
        order_update_emails=u.preferences.order_update_emails if u.HasField("preferences") else True,
        version=u.version)


def record_user(event: user_events_pb2.UserCreated | user_events_pb2.UserUpdated) -> commands.RecordUser:
    return _user(event.user)


def welcome(event: user_events_pb2.UserCreated) -> commands.Notify:
    return commands.Notify(user_id=event.user.id, content=Welcome(), user=_user(event.user))


def forget_user(event: user_events_pb2.UserDeleted) -> commands.ForgetUser:
    return commands.ForgetUser(user_id=event.user_id)


def money(m: money_pb2.Money) -> Money:
    return Money(currency_code=m.currency_code, amount_minor=m.amount_minor)


def _order(order_id: str, items: list[order_pb2.OrderItem], total: money_pb2.Money, create_time: Timestamp,
           has_create_time: bool) -> OrderFacts:
    lines = tuple(Line(product_name=i.product_name or i.product_id, sku=i.sku, quantity=i.quantity,
                       unit_price=money(i.unit_price), line_total=money(i.line_total)) for i in items)
    return OrderFacts(order_id=order_id, lines=lines, total=money(total), create_time=_time(create_time,
                                                                                            has_create_time))


def receipt(event: order_events_pb2.OrderConfirmed) -> commands.Notify:
    order = _order(event.order_id, list(event.items), event.total, event.create_time, event.HasField("create_time"))
    return commands.Notify(user_id=event.customer_id, content=Receipt(order=order, payment_id=event.payment_id))


def placement_failure(event: order_events_pb2.OrderFailed) -> commands.Notify:
    order = _order(event.order_id, list(event.items), event.total, event.create_time, event.HasField("create_time"))
    return commands.Notify(user_id=event.customer_id, content=PlacementFailure(
        order=order, message=event.failure.message, refunded_payment_id=event.refunded_payment_id))


def cancellation(event: order_events_pb2.OrderCancelled) -> commands.Notify:
    # The refunded amount is the order's total (the contract says so).
    order = _order(event.order_id, list(event.items), event.refunded_amount, event.create_time,
                   event.HasField("create_time"))
    return commands.Notify(user_id=event.customer_id, content=Cancellation(
        order=order, refunded=money(event.refunded_amount), reason=event.reason))


def refund(event: payment_events_pb2.PaymentRefunded) -> commands.Notify:
    return commands.Notify(user_id=event.customer_id, content=Refund(
        order_id=event.order_id, amount=money(event.amount), reason=event.reason))
