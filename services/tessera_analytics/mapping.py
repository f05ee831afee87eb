"""The one place where protobuf and the analytics domain meet: events in, daily metrics out."""

from __future__ import annotations

import datetime as dt

from tessera.analytics.v1 import analytics_pb2
from tessera.common.v1 import money_pb2
from tessera.order.v1 import order_events_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2

from tessera_analytics.domain import model
from tessera_analytics.domain.model import DailyMetrics, InvalidEvent, Money, Tally
from tessera_runtime.messaging import EventMeta


def _when(event, meta: EventMeta) -> dt.datetime | None:
    """When the fact happened: the event's occur_time; for an event without one, when its producer wrote it."""
    if event.HasField("occur_time"):
        try:
            return event.occur_time.ToDatetime(tzinfo=dt.UTC)
        except ValueError as exc:  # seconds past 9999-12-31 or before 0001-01-01, nanos out of range
            raise InvalidEvent(f"the occur_time is no valid timestamp: {exc}") from None
    return meta.published_at


def _money(event, field: str) -> Money | None:
    if not event.HasField(field):
        return None
    value: money_pb2.Money = getattr(event, field)
    return Money(value.currency_code, value.amount_minor)


def user_created(event: user_events_pb2.UserCreated, meta: EventMeta) -> Tally:
    return model.user_registered(_when(event, meta))


def order_confirmed(event: order_events_pb2.OrderConfirmed, meta: EventMeta) -> Tally:
    return model.order_confirmed(_when(event, meta), _money(event, "total"))


def order_failed(event: order_events_pb2.OrderFailed, meta: EventMeta) -> Tally:
    return model.order_failed(_when(event, meta), event.failure.reason)


def order_cancelled(event: order_events_pb2.OrderCancelled, meta: EventMeta) -> Tally:
    return model.order_cancelled(_when(event, meta))


def payment_refunded(event: payment_events_pb2.PaymentRefunded, meta: EventMeta) -> Tally:
    return model.payment_refunded(_when(event, meta), _money(event, "amount"))


def _money_to_proto(items: tuple[Money, ...]) -> list[money_pb2.Money]:
    return [money_pb2.Money(currency_code=m.currency_code, amount_minor=m.amount_minor) for m in items]


def daily_metrics_to_proto(m: DailyMetrics) -> analytics_pb2.DailyMetrics:
    return analytics_pb2.DailyMetrics(
        date=m.day.isoformat() if m.day else "",
        users_registered=m.users_registered,
        orders_confirmed=m.orders_confirmed,
        orders_failed=m.orders_failed,
        orders_cancelled=m.orders_cancelled,
        revenue=_money_to_proto(m.revenue),
        payments_refunded=m.payments_refunded,
        refunded=_money_to_proto(m.refunded),
        failure_reasons=[analytics_pb2.FailureReasonCount(reason=reason, count=count)
                         for reason, count in m.failure_reasons],
    )


def summary_to_proto(start: dt.date, end: dt.date, totals: DailyMetrics) -> analytics_pb2.MetricsSummary:
    return analytics_pb2.MetricsSummary(start_date=start.isoformat(), end_date=end.isoformat(),
                                        totals=daily_metrics_to_proto(totals))
