"""Commands the user service handles: what a caller asks for, already translated from protobuf."""

from __future__ import annotations

import dataclasses

from tessera_user.domain.model import Preferences, Profile, UserStatus


@dataclasses.dataclass(frozen=True)
class CreateUser:
    email: str
    display_name: str
    profile: Profile
    preferences: Preferences
    request_id: str
    # Output-only fields the caller filled in; refused rather than silently ignored.
    output_only_set: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GetUser:
    user_id: str


@dataclasses.dataclass(frozen=True)
class ListUsers:
    page_size: int
    page_token: str
    status: UserStatus | None
    # A status value the contract does not define; refused rather than read as "every status".
    unknown_status: int | None = None


@dataclasses.dataclass(frozen=True)
class UpdateUser:
    user_id: str
    paths: tuple[str, ...]
    display_name: str
    profile: Profile
    preferences: Preferences


@dataclasses.dataclass(frozen=True)
class DeleteUser:
    user_id: str


@dataclasses.dataclass(frozen=True)
class DeactivateUser:
    user_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ActivateUser:
    user_id: str
