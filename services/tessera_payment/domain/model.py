"""The payment aggregate, its lifecycle, and the rules its fields obey."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum

from tessera_payment import DOMAIN
from tessera_runtime.errors import NUL_REFUSED, Violations, has_nul, is_blank
from tessera_runtime.money import ISO_4217_CODES, is_iso_currency

MIN_AMOUNT = 1
MAX_AMOUNT = 1_000_000_000_000_000  # the contract's maximum (payment.proto, Payment.amount)
MAX_PAYMENT_METHOD = 255
MAX_KEY = 64
MAX_REASON = 500
MAX_DECLINE_CODE = 64
MAX_FAILURE_MESSAGE = 1000
MAX_PROCESSOR_REFERENCE = 255

# The currencies a payment may be in: every active ISO 4217 code (tessera_runtime.money keeps the list).
CURRENCIES = ISO_4217_CODES


@dataclasses.dataclass(frozen=True)
class Money:
    currency_code: str
    amount_minor: int


class PaymentStatus(enum.Enum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    DECLINED = "DECLINED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"
    VOIDED = "VOIDED"


# Final statuses in which no money was taken: VoidPayment leaves such a payment as it is.
UNCHARGED_FINAL = (PaymentStatus.VOIDED, PaymentStatus.DECLINED)


@dataclasses.dataclass
class Payment:
    id: str
    order_id: str
    customer_id: str
    amount: Money
    payment_method: str
    idempotency_key: str
    status: PaymentStatus
    create_time: dt.datetime
    update_time: dt.datetime
    decline_code: str = ""
    failure_message: str = ""
    refunded_amount_minor: int = 0
    processor_reference: str = ""
    attempts: int = 0
    refund_reason: str = ""
    refund_time: dt.datetime | None = None
    refund_reference: str = ""
    # The idempotency key the processor is (or was) asked to refund with: set when a call claims the refund, before
    # it asks the processor, and kept once REFUNDED. While the payment is still SUCCEEDED it marks a refund under way
    # (or one whose outcome is not recorded yet): no other call may ask the processor until it is settled.
    refund_key: str | None = None
    # While PENDING: until when the call that is charging owns the payment; while SUCCEEDED with a refund claimed:
    # until when the call that is refunding owns it. Past this time the call crashed or lost its database, and the
    # payment may be taken over.
    lease_expire_time: dt.datetime | None = None
    version: int = 1

    def owned_until(self, now: dt.datetime) -> bool:
        """True while a live call is charging this payment."""
        return (self.status is PaymentStatus.PENDING and self.lease_expire_time is not None
                and self.lease_expire_time > now)

    def take_over(self, lease: dt.datetime, now: dt.datetime) -> None:
        """A new call charges a FAILED payment again, or resumes a PENDING one whose call was lost."""
        if self.status not in (PaymentStatus.FAILED, PaymentStatus.PENDING):
            raise ValueError(f"cannot charge a {self.status.value} payment again")
        self.status = PaymentStatus.PENDING
        self.lease_expire_time = lease
        self._touch(now)

    def count_attempt(self, now: dt.datetime) -> None:
        self._require(PaymentStatus.PENDING)
        self.attempts += 1
        self._touch(now)

    def succeed(self, processor_reference: str, now: dt.datetime) -> None:
        self._require(PaymentStatus.PENDING)
        self.status = PaymentStatus.SUCCEEDED
        self.processor_reference = processor_reference[:MAX_PROCESSOR_REFERENCE]
        self.decline_code = ""
        self._settle(now)

    def decline(self, decline_code: str, message: str, now: dt.datetime) -> None:
        self._require(PaymentStatus.PENDING)
        self.status = PaymentStatus.DECLINED
        self.decline_code = decline_code[:MAX_DECLINE_CODE]
        self.failure_message = message[:MAX_FAILURE_MESSAGE]
        self._settle(now)

    def fail(self, message: str, now: dt.datetime) -> None:
        self._require(PaymentStatus.PENDING)
        self.status = PaymentStatus.FAILED
        self.failure_message = message[:MAX_FAILURE_MESSAGE]
        self._settle(now)

    def void(self, now: dt.datetime) -> None:
        """A FAILED payment becomes final without a charge: ProcessPayment never tries it again."""
        self._require(PaymentStatus.FAILED)
        self.status = PaymentStatus.VOIDED
        self._settle(now)

    def void_interrupted(self, message: str, now: dt.datetime) -> None:
        """A PENDING payment whose charging call is gone, and that the processor never charged, becomes final
        without a charge (instead of FAILED, which ProcessPayment would try again)."""
        self._require(PaymentStatus.PENDING)
        self.status = PaymentStatus.VOIDED
        self.failure_message = message[:MAX_FAILURE_MESSAGE]
        self._settle(now)

    def note_failure(self, message: str) -> None:
        """Keeps the message of a failed attempt that a later attempt may still overcome."""
        self.failure_message = message[:MAX_FAILURE_MESSAGE]

    @property
    def refund_claimed(self) -> bool:
        """A call claimed the refund of this SUCCEEDED payment and its outcome is not recorded yet."""
        return self.status is PaymentStatus.SUCCEEDED and self.refund_key is not None

    def refund_owned_until(self, now: dt.datetime) -> bool:
        """True while a live call is refunding this payment."""
        return self.refund_claimed and self.lease_expire_time is not None and self.lease_expire_time > now

    def claim_refund(self, key: str, reason: str, lease: dt.datetime, now: dt.datetime) -> None:
        """A call is about to ask the processor to refund, for `reason`. A claim taken over from a call that is gone
        keeps that call's key and reason: a processor that deduplicates refunds by key then recognises the same
        refund."""
        self._require(PaymentStatus.SUCCEEDED)
        if self.refund_key is None:
            self.refund_key = key
            self.refund_reason = reason
        self.lease_expire_time = lease
        self._touch(now)

    def release_refund(self, now: dt.datetime) -> None:
        """The claimed refund was not paid out: the payment is refundable again, by any call."""
        self._require(PaymentStatus.SUCCEEDED)
        self.refund_key = None
        self.refund_reason = ""
        self.lease_expire_time = None
        self._touch(now)

    def refund(self, reason: str, refund_reference: str, now: dt.datetime) -> None:
        self._require(PaymentStatus.SUCCEEDED)
        self.status = PaymentStatus.REFUNDED
        self.lease_expire_time = None
        self.refunded_amount_minor = self.amount.amount_minor
        self.refund_reason = reason
        self.refund_reference = refund_reference[:MAX_PROCESSOR_REFERENCE]
        self.refund_time = now
        self._touch(now)

    def _settle(self, now: dt.datetime) -> None:
        self.lease_expire_time = None
        self._touch(now)

    def _touch(self, now: dt.datetime) -> None:
        self.update_time = now
        self.version += 1

    def _require(self, status: PaymentStatus) -> None:
        if self.status is not status:
            raise ValueError(f"payment is {self.status.value}, not {status.value}")


def new_violations() -> Violations:
    return Violations(DOMAIN)


def check_key(value: str, field: str, v: Violations) -> None:
    if is_blank(value):  # a key of spaces is as good as none: no client chose it to tell its calls apart
        v.add(field, "is required")
    elif len(value) > MAX_KEY or not value.isprintable():
        v.add(field, f"must be 1 to {MAX_KEY} printable characters")


def check_amount(amount: Money | None, field: str, v: Violations) -> None:
    if amount is None:
        v.add(field, "is required")
        return
    if not amount.currency_code:
        v.add(f"{field}.currency_code", "is required")
    elif not is_iso_currency(amount.currency_code):
        v.add(f"{field}.currency_code", "must be an ISO 4217 currency code in upper case, such as EUR")
    if not MIN_AMOUNT <= amount.amount_minor <= MAX_AMOUNT:
        v.add(f"{field}.amount_minor", f"must be between {MIN_AMOUNT} and {MAX_AMOUNT:,}")


def check_payment_method(method: str, field: str, v: Violations) -> None:
    if is_blank(method):
        v.add(field, "is required")
    elif len(method) > MAX_PAYMENT_METHOD or not method.isprintable():
        v.add(field, f"must be 1 to {MAX_PAYMENT_METHOD} printable characters")


def check_reason(reason: str, field: str, v: Violations) -> None:
    if len(reason) > MAX_REASON:
        v.add(field, f"must be at most {MAX_REASON} characters")
    elif has_nul(reason):
        v.add(field, NUL_REFUSED)
