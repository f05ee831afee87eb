"""What each notification says: the facts of its event, rendered with the recipient's name and locale through
the plain-text templates in tessera_notification/templates (string.Template, "Subject:" on the first line)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import string
from importlib import resources

from tessera_notification.domain.model import NotificationKind, Recipient
from tessera_notification.domain.money import Money, format_money


@dataclasses.dataclass(frozen=True)
class Line:
    product_name: str
    sku: str
    quantity: int
    unit_price: Money
    line_total: Money


@dataclasses.dataclass(frozen=True)
class OrderFacts:
    order_id: str
    lines: tuple[Line, ...]
    total: Money
    create_time: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Welcome:
    kind = NotificationKind.WELCOME
    order_id = ""


@dataclasses.dataclass(frozen=True)
class Receipt:
    order: OrderFacts
    payment_id: str
    kind = NotificationKind.ORDER_RECEIPT

    @property
    def order_id(self) -> str:
        return self.order.order_id


@dataclasses.dataclass(frozen=True)
class PlacementFailure:
    order: OrderFacts
    message: str
    refunded_payment_id: str
    kind = NotificationKind.ORDER_FAILED

    @property
    def order_id(self) -> str:
        return self.order.order_id


@dataclasses.dataclass(frozen=True)
class Cancellation:
    order: OrderFacts
    refunded: Money
    reason: str
    kind = NotificationKind.ORDER_CANCELLED

    @property
    def order_id(self) -> str:
        return self.order.order_id


@dataclasses.dataclass(frozen=True)
class Refund:
    order_id: str
    amount: Money
    reason: str
    kind = NotificationKind.PAYMENT_REFUNDED


Content = Welcome | Receipt | PlacementFailure | Cancellation | Refund

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x85\u2028\u2029]+")
_TEMPLATES = {
    NotificationKind.WELCOME: "welcome.txt",
    NotificationKind.ORDER_RECEIPT: "order_receipt.txt",
    NotificationKind.ORDER_FAILED: "order_failed.txt",
    NotificationKind.ORDER_CANCELLED: "order_cancelled.txt",
    NotificationKind.PAYMENT_REFUNDED: "payment_refunded.txt",
}


@dataclasses.dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


@functools.cache
def _template(kind: NotificationKind) -> tuple[string.Template, string.Template]:
    text = resources.files("tessera_notification").joinpath("templates", _TEMPLATES[kind]).read_text("utf-8")
    first, _, body = text.partition("\n")
    if not first.startswith("Subject: "):
        raise ValueError(f"template {_TEMPLATES[kind]} must start with a 'Subject: ' line")
    return string.Template(first.removeprefix("Subject: ")), string.Template(body.lstrip("\n"))


def _date(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d") if value is not None else "(unknown date)"


def _lines(lines: tuple[Line, ...], locale: str) -> str:
    rows = []
    for line in lines:
        sku = f" ({line.sku})" if line.sku else ""
        rows.append(f"  {line.quantity} × {line.product_name}{sku} at {format_money(line.unit_price, locale)}"
                    f" = {format_money(line.line_total, locale)}")
    return "\n".join(rows) if rows else "  (no items)"


def _clause(reason: str) -> str:
    reason = " ".join(reason.split())
    return f" ({reason})" if reason else ""


def values(content: Content, recipient: Recipient) -> dict[str, str]:
    """The template variables of a notification."""
    locale = recipient.locale
    out = {"name": recipient.display_name or recipient.email, "email": recipient.email}
    if isinstance(content, Welcome):
        out["order_emails_note"] = (
            "We will e-mail you a receipt for every order you place." if recipient.order_update_emails else
            "You chose not to receive e-mails about your orders; you can change that in your preferences.")
        return out
    if isinstance(content, Refund):
        return {**out, "order_id": content.order_id, "order_ref": content.order_id[:8].upper(),
                "amount": format_money(content.amount, locale), "reason_clause": _clause(content.reason)}
    order = content.order
    out.update(order_id=order.order_id, order_ref=order.order_id[:8].upper(), order_date=_date(order.create_time),
               lines=_lines(order.lines, locale), total=format_money(order.total, locale))
    if isinstance(content, Receipt):
        out["payment_id"] = content.payment_id or "-"
    elif isinstance(content, PlacementFailure):
        out["failure"] = content.message or "The order could not be completed."
        out["charge_note"] = ("The payment we had taken was refunded in full." if content.refunded_payment_id
                              else "You have not been charged.")
    else:
        out["refunded"] = format_money(content.refunded, locale)
        out["reason_clause"] = _clause(content.reason)
    return out


def render(content: Content, recipient: Recipient) -> Rendered:
    subject, body = _template(content.kind)
    data = values(content, recipient)
    # Subjects are one line whatever the data (a display name cannot inject a header).
    return Rendered(subject=_LINE_BREAKS.sub(" ", subject.substitute(data)).strip(), body=body.substitute(data))
