"""The one place where user protos and the user domain meet: requests in, resources and events out."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp
from tessera.user.v1 import user_events_pb2 as events_pb2
from tessera.user.v1 import user_pb2

from tessera_user.domain.model import Preferences, Profile, User, UserStatus

_STATUS_TO_PROTO = {UserStatus.ACTIVE: user_pb2.USER_STATUS_ACTIVE, UserStatus.INACTIVE: user_pb2.USER_STATUS_INACTIVE}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def status_from_proto(value: int) -> UserStatus | None:
    return _STATUS_FROM_PROTO.get(value)


def profile_from_proto(p: user_pb2.Profile) -> Profile:
    return Profile(given_name=p.given_name, family_name=p.family_name, phone_number=p.phone_number,
                   locale=p.locale, time_zone=p.time_zone)


def preferences_from_proto(p: user_pb2.Preferences) -> Preferences:
    return Preferences(marketing_emails=p.marketing_emails, order_update_emails=p.order_update_emails,
                       preferred_currency_code=p.preferred_currency_code)


def user_to_proto(user: User) -> user_pb2.User:
    return user_pb2.User(
        id=user.id, email=user.email, display_name=user.display_name, status=_STATUS_TO_PROTO[user.status],
        profile=user_pb2.Profile(**vars_of(user.profile)),
        preferences=user_pb2.Preferences(**vars_of(user.preferences)),
        create_time=timestamp(user.create_time), update_time=timestamp(user.update_time), version=user.version,
    )


def vars_of(obj: object) -> dict:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def user_created(user: User) -> events_pb2.UserCreated:
    return events_pb2.UserCreated(user=user_to_proto(user), occur_time=timestamp(user.create_time))


def user_updated(user: User, paths: list[str]) -> events_pb2.UserUpdated:
    return events_pb2.UserUpdated(user=user_to_proto(user), changed_paths=paths,
                                  occur_time=timestamp(user.update_time))


def user_deactivated(user: User, reason: str) -> events_pb2.UserDeactivated:
    return events_pb2.UserDeactivated(user_id=user.id, reason=reason, occur_time=timestamp(user.update_time))


def user_activated(user: User) -> events_pb2.UserActivated:
    return events_pb2.UserActivated(user_id=user.id, occur_time=timestamp(user.update_time))


def user_deleted(user_id: str, when: dt.datetime) -> events_pb2.UserDeleted:
    return events_pb2.UserDeleted(user_id=user_id, occur_time=timestamp(when))
