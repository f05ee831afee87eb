"""ISO 4217 currency codes: the one list every Tessera context checks currency_code fields against."""

from __future__ import annotations

# Active ISO 4217 alphabetic codes (list one of the ISO 4217 maintenance agency), without XXX ("no currency")
# and XTS (reserved for testing), which are never a price's currency. Withdrawn codes are not listed: ANG (replaced
# by XCG in 2025), CUC (2021), SLL (replaced by SLE) and ZWL (replaced by ZWG in 2024).
ISO_4217_CODES: frozenset[str] = frozenset("""
AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF
CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD
GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR
LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK
PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG
XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG
""".split())


def is_iso_currency(code: str) -> bool:
    """True for an active ISO 4217 code in upper case, such as "EUR"."""
    return code in ISO_4217_CODES
