"""The payment processor port: what the payment service needs from whoever actually moves the money.

An implementation talks to one processor (the sandbox here; a card acquirer or PSP in production). Its promises,
which the service relies on to never charge twice:

- `charge` is idempotent per `charge_key`: a second charge with a key that was already charged returns that
  charge and takes no money. The service uses the payment id as the key, so retries, calls that time out and
  payments taken over after a crash all end in at most one charge.
- `charge` returns Charged or Declined, or raises ProcessorUnavailable for a failure that a later attempt may
  overcome (no money was taken). A call that does not return in time is cancelled by the service; whether it
  charged is then learnt from `find_charge`.
- `find_charge` reports the charge made with a key, if any, without charging.
- `refund` refunds a charge in full, passing the request's idempotency key on. The service does not rely on the
  processor to refuse a second refund of a charge: it claims the refund in the payment record first, so only one
  refund at a time is asked for, and one whose call did not learn the answer is looked up with `find_refund`
  before the payment is refunded again.
- `find_refund` reports the refund of a charge, if any, without refunding.
"""

from __future__ import annotations

import abc
import dataclasses

from tessera_payment.domain.model import Money


@dataclasses.dataclass(frozen=True)
class ChargeRequest:
    charge_key: str
    amount: Money
    payment_method: str
    # 1 for the first attempt at this charge, 2 for the next, ...: counted by the service in the payment record.
    attempt: int
    order_id: str = ""
    customer_id: str = ""


@dataclasses.dataclass(frozen=True)
class Charged:
    reference: str


@dataclasses.dataclass(frozen=True)
class Declined:
    decline_code: str
    message: str


@dataclasses.dataclass(frozen=True)
class RefundRequest:
    charge_reference: str
    amount: Money
    idempotency_key: str


@dataclasses.dataclass(frozen=True)
class Refunded:
    reference: str


class ProcessorUnavailable(Exception):
    """The processor could not complete the operation this time; nothing happened and a retry may succeed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PaymentProcessor(abc.ABC):
    @abc.abstractmethod
    async def charge(self, request: ChargeRequest) -> Charged | Declined: ...

    @abc.abstractmethod
    async def find_charge(self, charge_key: str) -> Charged | None: ...

    @abc.abstractmethod
    async def refund(self, request: RefundRequest) -> Refunded: ...

    @abc.abstractmethod
    async def find_refund(self, charge_reference: str) -> Refunded | None: ...
