"""The user aggregate and the rules its fields obey."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import re
import zoneinfo

from tessera_runtime.errors import Violations, is_blank, is_one_line_text
from tessera_runtime.money import is_iso_currency
from tessera_user import DOMAIN

MAX_EMAIL = 254
MAX_DISPLAY_NAME = 100
MAX_NAME = 100
MAX_PHONE = 16
MAX_LOCALE = 35
MAX_TIME_ZONE = 64
MAX_REQUEST_ID = 64
MAX_REASON = 500

# Pragmatic address syntax: one @, a dot-atom local part, and a domain of LDH labels with a TLD of letters, or an
# internationalised TLD in its ASCII form (xn--p1ai for .рф). The patterns are applied with fullmatch: with match,
# "$" also matches before a final line break.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                     r"([A-Za-z]{2,63}|xn--[A-Za-z0-9-]{0,58}[A-Za-z0-9])")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
# A well-formed BCP 47 language tag (RFC 5646, section 2.1): language (with up to three extlang subtags), script,
# region, variants, extensions (a singleton other than x and subtags of 2 to 8 characters), private use; or a tag of
# private use only, or one of the irregular grandfathered tags (the regular ones have the langtag form already).
_LOCALE = re.compile(
    r"(?:(?:[a-z]{2,3}(?:-[a-z]{3}){0,3}|[a-z]{4,8})"
    r"(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?(?:-(?:[a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*"
    r"(?:-[0-9a-wyz](?:-[a-z0-9]{2,8})+)*(?:-x(?:-[a-z0-9]{1,8})+)?"
    r"|x(?:-[a-z0-9]{1,8})+"
    r"|en-gb-oed|i-(?:ami|bnn|default|enochian|hak|klingon|lux|mingo|navajo|pwn|tao|tay|tsu)"
    r"|sgn-(?:be-fr|be-nl|ch-de))", re.IGNORECASE | re.ASCII)


class UserStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


@dataclasses.dataclass(frozen=True)
class Profile:
    given_name: str = ""
    family_name: str = ""
    phone_number: str = ""
    locale: str = ""
    time_zone: str = ""


@dataclasses.dataclass(frozen=True)
class Preferences:
    marketing_emails: bool = False
    order_update_emails: bool = True
    preferred_currency_code: str = ""


@dataclasses.dataclass
class User:
    id: str
    email: str
    display_name: str
    status: UserStatus
    profile: Profile
    preferences: Preferences
    create_time: dt.datetime
    update_time: dt.datetime
    version: int = 1

    @property
    def active(self) -> bool:
        return self.status is UserStatus.ACTIVE

    def deactivate(self, now: dt.datetime) -> bool:
        """Suspends the account; returns False when it already was inactive."""
        if self.status is UserStatus.INACTIVE:
            return False
        self.status = UserStatus.INACTIVE
        self._touch(now)
        return True

    def activate(self, now: dt.datetime) -> bool:
        """Reactivates the account; returns False when it already was active."""
        if self.status is UserStatus.ACTIVE:
            return False
        self.status = UserStatus.ACTIVE
        self._touch(now)
        return True

    def _touch(self, now: dt.datetime) -> None:
        self.update_time = now
        self.version += 1


def normalise_email(raw: str) -> str:
    """Trims spaces and lower-cases the domain; the local part keeps its case (RFC 5321), but uniqueness is
    checked case-insensitively by the repository."""
    raw = raw.strip()
    local, sep, domain = raw.rpartition("@")
    if not sep:
        return raw
    return f"{local}@{domain.lower()}"


def check_email(email: str, field: str, v: Violations) -> None:
    if not email:
        v.add(field, "is required")
        return
    if len(email) > MAX_EMAIL:
        v.add(field, f"must be at most {MAX_EMAIL} characters")
        return
    local, sep, domain = email.rpartition("@")
    if not sep or not local or len(local) > 64 or not _LOCAL.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        v.add(field, "is not a valid e-mail address")


def check_display_name(name: str, field: str, v: Violations) -> None:
    if is_blank(name):
        v.add(field, "is required")
    elif len(name) > MAX_DISPLAY_NAME:
        v.add(field, f"must be at most {MAX_DISPLAY_NAME} characters")
    elif not is_one_line_text(name):
        v.add(field, "must not contain control characters or line breaks")


@functools.cache
def iana_time_zones() -> frozenset[str]:
    """The names of the IANA time zone database (the tzdata package, or the system's), read once. "localtime" is a
    file some systems keep beside the zones (a link to the machine's own zone), not a zone name."""
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def _is_time_zone(value: str) -> bool:
    return value in iana_time_zones()


def check_profile_field(name: str, value: str, field: str, v: Violations) -> None:
    if not value:
        return
    rules = {
        "given_name": (MAX_NAME, None, "a name"),
        "family_name": (MAX_NAME, None, "a name"),
        "phone_number": (MAX_PHONE, _PHONE.fullmatch, "an E.164 phone number such as +4930123456"),
        "locale": (MAX_LOCALE, _LOCALE.fullmatch, "a BCP 47 language tag such as en, de-DE or en-u-ca-gregory"),
        "time_zone": (MAX_TIME_ZONE, _is_time_zone,
                      "a time zone name of the IANA database such as Europe/Berlin, Etc/GMT+5 or EST5EDT"),
    }
    limit, valid, what = rules[name]
    if is_blank(value):
        v.add(field, "must not be only spaces; leave it empty to give none")
    elif len(value) > limit:
        v.add(field, f"must be at most {limit} characters")
    elif not is_one_line_text(value) or (valid is not None and not valid(value)):
        v.add(field, f"must be {what}")


def check_profile(profile: Profile, prefix: str, v: Violations) -> None:
    for f in dataclasses.fields(Profile):
        check_profile_field(f.name, getattr(profile, f.name), f"{prefix}.{f.name}", v)


def check_currency(code: str, field: str, v: Violations) -> None:
    if code and not is_iso_currency(code):
        v.add(field, "must be an ISO 4217 currency code in upper case, such as EUR")


def new_violations() -> Violations:
    return Violations(DOMAIN)
