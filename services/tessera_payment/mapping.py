"""The one place where payment protos and the payment domain meet: requests in, resources and events out."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from tessera.common.v1 import money_pb2
from tessera.payment.v1 import payment_events_pb2 as events_pb2
from tessera.payment.v1 import payment_pb2

from tessera_payment.domain.model import Money, Payment, PaymentStatus

_STATUS_TO_PROTO = {
    PaymentStatus.PENDING: payment_pb2.PAYMENT_STATUS_PENDING,
    PaymentStatus.SUCCEEDED: payment_pb2.PAYMENT_STATUS_SUCCEEDED,
    PaymentStatus.DECLINED: payment_pb2.PAYMENT_STATUS_DECLINED,
    PaymentStatus.FAILED: payment_pb2.PAYMENT_STATUS_FAILED,
    PaymentStatus.REFUNDED: payment_pb2.PAYMENT_STATUS_REFUNDED,
    PaymentStatus.VOIDED: payment_pb2.PAYMENT_STATUS_VOIDED,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def status_from_proto(value: int) -> PaymentStatus | None:
    return _STATUS_FROM_PROTO.get(value)


def status_name(status: PaymentStatus) -> str:
    """The PaymentStatus enum name, as ErrorInfo metadata "status" gives it."""
    return payment_pb2.PaymentStatus.Name(_STATUS_TO_PROTO[status])


def money_from_proto(m: money_pb2.Money) -> Money:
    return Money(currency_code=m.currency_code, amount_minor=m.amount_minor)


def money_to_proto(m: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=m.currency_code, amount_minor=m.amount_minor)


def payment_to_proto(p: Payment) -> payment_pb2.Payment:
    message = payment_pb2.Payment(
        id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        payment_method=p.payment_method, status=_STATUS_TO_PROTO[p.status], decline_code=p.decline_code,
        failure_message=p.failure_message,
        refunded_amount=money_pb2.Money(currency_code=p.amount.currency_code,
                                        amount_minor=p.refunded_amount_minor),
        processor_reference=p.processor_reference, idempotency_key=p.idempotency_key, attempts=p.attempts,
        # A refund under way keeps its reason in the record; the payment shows it once REFUNDED.
        refund_reason=p.refund_reason if p.status is PaymentStatus.REFUNDED else "",
        create_time=timestamp(p.create_time), update_time=timestamp(p.update_time),
        version=p.version,
    )
    if p.refund_time is not None:
        message.refund_time.CopyFrom(timestamp(p.refund_time))
    return message


def payment_succeeded(p: Payment) -> events_pb2.PaymentSucceeded:
    return events_pb2.PaymentSucceeded(
        payment_id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        processor_reference=p.processor_reference, occur_time=timestamp(p.update_time))


def payment_declined(p: Payment) -> events_pb2.PaymentDeclined:
    return events_pb2.PaymentDeclined(
        payment_id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        decline_code=p.decline_code, failure_message=p.failure_message, occur_time=timestamp(p.update_time))


def payment_failed(p: Payment, timed_out: bool) -> events_pb2.PaymentFailed:
    return events_pb2.PaymentFailed(
        payment_id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        failure_message=p.failure_message, timed_out=timed_out, attempts=p.attempts,
        occur_time=timestamp(p.update_time))


def payment_refunded(p: Payment) -> events_pb2.PaymentRefunded:
    return events_pb2.PaymentRefunded(
        payment_id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        reason=p.refund_reason, processor_reference=p.processor_reference, occur_time=timestamp(p.update_time))


def payment_voided(p: Payment) -> events_pb2.PaymentVoided:
    return events_pb2.PaymentVoided(
        payment_id=p.id, order_id=p.order_id, customer_id=p.customer_id, amount=money_to_proto(p.amount),
        failure_message=p.failure_message, attempts=p.attempts, occur_time=timestamp(p.update_time))
