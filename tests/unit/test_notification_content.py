"""What notifications say: money in the reader's locale, and each template rendered from its event's facts."""

from __future__ import annotations

import datetime as dt

import pytest

from tessera_notification.domain.content import (
    Cancellation,
    Line,
    OrderFacts,
    PlacementFailure,
    Receipt,
    Refund,
    Welcome,
    render,
)
from tessera_notification.domain.model import Recipient
from tessera_notification.domain.money import Money, format_money

NBSP = "\u00a0"


@pytest.mark.parametrize(("money", "locale", "text"), [
    (Money("EUR", 134800), "", "€1,348.00"),
    (Money("EUR", 134800), "en-GB", "€1,348.00"),
    (Money("EUR", 134800), "de-DE", f"1.348,00{NBSP}€"),
    (Money("EUR", 123456789), "fr", f"1{NBSP}234{NBSP}567,89{NBSP}€"),
    (Money("USD", 5), "en", "$0.05"),
    (Money("JPY", 1235), "ja", "¥1,235"),
    (Money("KWD", 1500), "", f"KWD{NBSP}1.500"),
    (Money("CHF", 999), "de_CH", f"9,99{NBSP}CHF"),
    (Money("CLF", 12345), "", f"CLF{NBSP}1.2345"),
    (Money("EUR", -250), "", "-€2.50"),
    (Money("EUR", 0), "", "€0.00"),
])
def test_money_is_formatted_from_minor_units_for_the_locale(money, locale, text):
    assert format_money(money, locale) == text


ADA = Recipient(user_id="u-1", email="ada@example.com", display_name="Ada Lovelace", locale="en",
                order_update_emails=True, version=1, deleted=False, update_time=dt.datetime.now(dt.UTC))
ORDER = OrderFacts(
    order_id="3f1c9a2e-0000-4000-8000-000000000000",
    lines=(Line("Walnut desk", "DESK-01", 1, Money("EUR", 129900), Money("EUR", 129900)),
           Line("Desk lamp", "", 2, Money("EUR", 2450), Money("EUR", 4900))),
    total=Money("EUR", 134800), create_time=dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC))


def test_welcome_greets_by_name_and_says_whether_order_emails_follow():
    rendered = render(Welcome(), ADA)
    assert rendered.subject == "Welcome to Tessera, Ada Lovelace"
    assert "Hello Ada Lovelace," in rendered.body and "ada@example.com" in rendered.body
    assert "receipt for every order" in rendered.body
    quiet = render(Welcome(), Recipient(**{**vars(ADA), "order_update_emails": False}))
    assert "You chose not to receive e-mails about your orders" in quiet.body


def test_receipt_lists_every_line_and_the_total():
    rendered = render(Receipt(order=ORDER, payment_id="pay-9"), ADA)
    assert rendered.subject == "Your Tessera order 3F1C9A2E is confirmed"
    assert "  1 × Walnut desk (DESK-01) at €1,299.00 = €1,299.00\n" in rendered.body
    assert "  2 × Desk lamp at €24.50 = €49.00" in rendered.body
    assert "Total       €1,348.00" in rendered.body
    assert "Ordered on  2026-11-30" in rendered.body and "Payment     pay-9" in rendered.body


def test_failure_cancellation_and_refund_say_what_happened_to_the_money():
    failed = render(PlacementFailure(order=ORDER, message="Walnut desk is out of stock.", refunded_payment_id=""), ADA)
    assert "could not be placed" in failed.subject and "Walnut desk is out of stock." in failed.body
    assert "You have not been charged." in failed.body
    refunded_failure = render(PlacementFailure(order=ORDER, message="", refunded_payment_id="pay-1"), ADA)
    assert "refunded in full" in refunded_failure.body and "could not be completed" in refunded_failure.body
    cancelled = render(Cancellation(order=ORDER, refunded=Money("EUR", 134800), reason="changed\nmy mind"), ADA)
    assert cancelled.subject == "Your Tessera order 3F1C9A2E is cancelled"
    assert "is cancelled (changed my mind)." in cancelled.body and "Refunded    €1,348.00" in cancelled.body
    refund = render(Refund(order_id=ORDER.order_id, amount=Money("EUR", 4900), reason=""), ADA)
    assert refund.subject == "Your refund of €49.00 for order 3F1C9A2E"
    assert f"we refunded €49.00 for your order {ORDER.order_id}." in refund.body


def test_a_display_name_cannot_break_the_subject_line():
    sneaky = Recipient(**{**vars(ADA), "display_name": "Ada\r\nBcc: victim@example.com"})
    subject = render(Welcome(), sneaky).subject
    assert "\n" not in subject and "\r" not in subject
