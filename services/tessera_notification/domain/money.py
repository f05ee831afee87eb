"""Money in e-mails: integer minor units of an ISO 4217 currency, written the way the reader's locale writes it."""

from __future__ import annotations

import dataclasses

# ISO 4217 minor units that are not 2 (every other active code has 2).
_EXPONENTS = {
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}
_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "INR": "₹", "KRW": "₩", "ILS": "₪", "NGN": "₦"}
# Languages that write 1.234,56 (decimal comma, dot groups) and 1 234,56 (decimal comma, space groups); the
# amount then comes before the currency. Every other language gets 1,234.56 with the currency first.
_DOT_GROUPS = frozenset("de es it nl pt tr da id ro el hr sl sr".split())
_SPACE_GROUPS = frozenset("fr sv pl cs sk ru uk fi nb nn no hu bg lt lv et".split())
_NBSP = "\u00a0"


@dataclasses.dataclass(frozen=True)
class Money:
    currency_code: str
    amount_minor: int


def exponent(currency_code: str) -> int:
    return _EXPONENTS.get(currency_code, 2)


def _grouped(whole: int, separator: str) -> str:
    text = str(whole)
    groups = []
    while len(text) > 3:
        groups.insert(0, text[-3:])
        text = text[:-3]
    groups.insert(0, text)
    return separator.join(groups)


def format_money(money: Money, locale: str = "") -> str:
    """"€1,234.56" for en (and by default), "1.234,56 €" for de, "1 234,56 €" for fr, "¥1,235" for JPY."""
    digits = exponent(money.currency_code)
    sign = "-" if money.amount_minor < 0 else ""
    whole, fraction = divmod(abs(money.amount_minor), 10 ** digits)
    language = locale.replace("_", "-").split("-")[0].lower()
    symbol = _SYMBOLS.get(money.currency_code)
    if language in _DOT_GROUPS or language in _SPACE_GROUPS:
        number = _grouped(whole, "." if language in _DOT_GROUPS else _NBSP)
        if digits:
            number += "," + str(fraction).zfill(digits)
        return f"{sign}{number}{_NBSP}{symbol or money.currency_code}"
    number = _grouped(whole, ",")
    if digits:
        number += "." + str(fraction).zfill(digits)
    return f"{sign}{symbol}{number}" if symbol else f"{sign}{money.currency_code}{_NBSP}{number}"
