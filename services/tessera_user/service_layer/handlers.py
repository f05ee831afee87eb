"""Use cases of the user service. Handlers raise domain errors; the runtime turns them into statuses."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import uuid
from typing import Protocol

from tessera_runtime import pagination
from tessera_runtime.context import current_principal
from tessera_runtime.db import utcnow
from tessera_runtime.errors import Aborted, AlreadyExists, NotFound, PermissionDenied, check_uuid
from tessera_runtime.fieldmask import check_update_mask
from tessera_user import DOMAIN, mapping
from tessera_user.adapters.repository import CreateRequest, DuplicateEmail, DuplicateRequestId, UserRepository
from tessera_user.domain import model
from tessera_user.domain.model import User, UserStatus
from tessera_user.service_layer import commands

AGGREGATE = "user"

MUTABLE_PATHS = frozenset({
    "display_name", "profile", "preferences",
    *(f"profile.{f.name}" for f in dataclasses.fields(model.Profile)),
    *(f"preferences.{f.name}" for f in dataclasses.fields(model.Preferences)),
})
IMMUTABLE_PATHS = frozenset({"id", "email", "status", "create_time", "update_time", "version"})


class UnitOfWork(Protocol):
    users: UserRepository

    def reading(self) -> UnitOfWork: ...
    def inserting(self) -> UnitOfWork: ...
    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def add_event(self, aggregate_type: str, aggregate_id: str, message) -> object: ...
    async def commit(self) -> None: ...


def check_id(value: str, field: str) -> str:
    """The account id a request names, in lower case: a UUID reads the same in either case, and accounts are stored
    (and callers named) by their lower-case ids."""
    v = model.new_violations()
    check_uuid(value, field, v)
    v.raise_if_any()
    return value.lower()


def _authorize(user_id: str) -> None:
    principal = current_principal()
    if principal is not None and not principal.may_act_for(user_id):
        raise PermissionDenied("you may only act on your own account", reason="PERMISSION_DENIED",
                               domain=DOMAIN, metadata={"user_id": user_id})


def _not_found(user_id: str) -> NotFound:
    return NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND", domain=DOMAIN,
                    metadata={"user_id": user_id})


def _request_hash(cmd: commands.CreateUser, email: str) -> str:
    # The address as the account is given it (normalise_email: the local part keeps its case): a repeat spelled
    # in another case asks for another account, and a replay answers with the address of the request it repeats.
    body = json.dumps([email, cmd.display_name, dataclasses.asdict(cmd.profile),
                       dataclasses.asdict(cmd.preferences)], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


async def create_user(cmd: commands.CreateUser, uow: UnitOfWork) -> User:
    v = model.new_violations()
    for field in cmd.output_only_set:
        v.add(f"user.{field}", "is output only and must be left empty")
    if not cmd.request_id:
        v.add("request_id", "is required")
    elif len(cmd.request_id) > model.MAX_REQUEST_ID or not cmd.request_id.isprintable():
        v.add("request_id", f"must be 1 to {model.MAX_REQUEST_ID} printable characters")
    email = model.normalise_email(cmd.email)
    model.check_email(email, "user.email", v)
    model.check_display_name(cmd.display_name, "user.display_name", v)
    model.check_profile(cmd.profile, "user.profile", v)
    model.check_currency(cmd.preferences.preferred_currency_code, "user.preferences.preferred_currency_code", v)
    v.raise_if_any()

    request_hash = _request_hash(cmd, email)
    for _ in range(2):  # a second pass only if the row that clashed was gone before it could be read
        # Insert first: the unique indexes on request_id and e-mail decide, so the common path is the user's row and
        # its event written together with no reads before them (on PostgreSQL one statement), and two concurrent
        # creates are ordered by the database itself.
        now = utcnow()
        user = User(id=str(uuid.uuid4()), email=email, display_name=cmd.display_name.strip(),
                    status=UserStatus.ACTIVE, profile=cmd.profile, preferences=cmd.preferences,
                    create_time=now, update_time=now)
        async with uow.inserting():
            try:
                await uow.users.add(user, cmd.request_id, request_hash)
                uow.add_event(AGGREGATE, user.id, mapping.user_created(user))
                await uow.commit()
            except (DuplicateEmail, DuplicateRequestId):
                pass  # nothing was written: see what clashed, below
            else:
                return user
        # Which unique index reports a clash depends on the database and on timing, so look the request_id up: the
        # same request_id replays (or is refused if its request differed); otherwise the e-mail is taken.
        async with uow.reading():
            previous = await uow.users.get_create_request(cmd.request_id)
            taken = previous is None and await uow.users.email_taken(email)
        if previous is not None:
            return _replay(previous, cmd, email, request_hash)
        if taken:
            raise _email_taken(email)
    raise Aborted("a concurrent change to an account with this e-mail address or request_id kept clashing; retry",
                  reason="CONCURRENT_CREATE", domain=DOMAIN, metadata={"request_id": cmd.request_id})


def _replay(previous: CreateRequest, cmd: commands.CreateUser, email: str, request_hash: str) -> User:
    """The first call's answer, whatever the account has become since (changed, deactivated or deleted): the
    account as that call created it. Its hash matched, so the repeat asks for exactly what the first call did, and
    that answer is this request's fields with the id and time the first call gave them; it tells the caller nothing
    about the account that the caller did not send."""
    if previous.request_hash != request_hash:
        raise AlreadyExists("request_id was already used with a different request", reason="REQUEST_ID_REUSED",
                            domain=DOMAIN, metadata={"request_id": cmd.request_id})
    return User(id=previous.user_id, email=email, display_name=cmd.display_name.strip(), status=UserStatus.ACTIVE,
                profile=cmd.profile, preferences=cmd.preferences, create_time=previous.create_time,
                update_time=previous.create_time)


async def purge_create_requests(uow: UnitOfWork, older_than: dt.timedelta, batch: int) -> int:
    """Forgets the CreateUser calls answered more than `older_than` ago, at most `batch` of them: a repeat of one of
    those is a new call (refused with EMAIL_ALREADY_EXISTS while the account exists)."""
    async with uow:
        purged = await uow.users.purge_create_requests(utcnow() - older_than, batch)
        await uow.commit()
    return purged


def _email_taken(email: str) -> AlreadyExists:
    return AlreadyExists("a user with this e-mail address already exists", reason="EMAIL_ALREADY_EXISTS",
                         domain=DOMAIN, metadata={"field": "user.email"})


async def get_user(cmd: commands.GetUser, uow: UnitOfWork) -> User:
    user_id = check_id(cmd.user_id, "id")
    _authorize(user_id)
    async with uow.reading():
        user = await uow.users.get(user_id)
    if user is None:
        raise _not_found(user_id)
    return user


async def list_users(cmd: commands.ListUsers, uow: UnitOfWork) -> tuple[list[User], str]:
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        raise PermissionDenied("listing accounts needs the admin scope", reason="PERMISSION_DENIED", domain=DOMAIN)
    if cmd.unknown_status is not None:
        v = model.new_violations()
        v.add("status", f"{cmd.unknown_status} is not a UserStatus")
        v.raise_if_any()
    size = pagination.page_size(cmd.page_size, DOMAIN)
    filters = {"status": cmd.status.value if cmd.status else None}
    after = pagination.decode_time_key(cmd.page_token, "ListUsers", filters, DOMAIN)
    async with uow.reading():
        page = await uow.users.list_after(after, size + 1, cmd.status)
    page, token = pagination.next_page(page, size, "ListUsers", filters)
    return page, token


async def update_user(cmd: commands.UpdateUser, uow: UnitOfWork) -> User:
    user_id = check_id(cmd.user_id, "user.id")
    v = model.new_violations()
    paths = check_update_mask(cmd.paths, mutable=MUTABLE_PATHS, immutable=IMMUTABLE_PATHS, resource="User",
                              violations=v)
    v.raise_if_any()
    if "display_name" in paths:
        model.check_display_name(cmd.display_name, "user.display_name", v)
    for f in dataclasses.fields(model.Profile):
        if "profile" in paths or f"profile.{f.name}" in paths:
            model.check_profile_field(f.name, getattr(cmd.profile, f.name), f"user.profile.{f.name}", v)
    if "preferences" in paths or "preferences.preferred_currency_code" in paths:
        model.check_currency(cmd.preferences.preferred_currency_code,
                             "user.preferences.preferred_currency_code", v)
    v.raise_if_any()
    _authorize(user_id)

    async with uow:
        user = await uow.users.get_for_update(user_id)
        if user is None:
            raise _not_found(user_id)
        before = dataclasses.replace(user)
        if "display_name" in paths:
            user.display_name = cmd.display_name.strip()
        user.profile = _merge(user.profile, cmd.profile, "profile", paths)
        user.preferences = _merge(user.preferences, cmd.preferences, "preferences", paths)
        changed = _changed_paths(before, user)
        if not changed:
            return user
        user.update_time = utcnow()
        user.version += 1
        if not await uow.users.save(user):
            raise _not_found(user_id)
        uow.add_event(AGGREGATE, user.id, mapping.user_updated(user, changed))
        await uow.commit()
    return user


def _merge(current, requested, prefix: str, paths: set[str]):
    if prefix in paths:
        return requested
    changes = {f.name: getattr(requested, f.name) for f in dataclasses.fields(current)
               if f"{prefix}.{f.name}" in paths}
    return dataclasses.replace(current, **changes)


def _changed_paths(before: User, after: User) -> list[str]:
    changed = []
    if before.display_name != after.display_name:
        changed.append("display_name")
    for prefix in ("profile", "preferences"):
        old, new = getattr(before, prefix), getattr(after, prefix)
        changed += [f"{prefix}.{f.name}" for f in dataclasses.fields(old)
                    if getattr(old, f.name) != getattr(new, f.name)]
    return changed


async def delete_user(cmd: commands.DeleteUser, uow: UnitOfWork) -> None:
    user_id = check_id(cmd.user_id, "id")
    _authorize(user_id)
    async with uow:
        if not await uow.users.delete(user_id):
            raise _not_found(user_id)
        uow.add_event(AGGREGATE, user_id, mapping.user_deleted(user_id, utcnow()))
        await uow.commit()


async def deactivate_user(cmd: commands.DeactivateUser, uow: UnitOfWork) -> User:
    user_id = check_id(cmd.user_id, "id")
    if len(cmd.reason) > model.MAX_REASON:
        v = model.new_violations()
        v.add("reason", f"must be at most {model.MAX_REASON} characters")
        v.raise_if_any()
    _require_admin("deactivating an account")
    async with uow:
        user = await uow.users.get_for_update(user_id)
        if user is None:
            raise _not_found(user_id)
        if user.deactivate(utcnow()):
            if not await uow.users.save(user):
                raise _not_found(user_id)
            uow.add_event(AGGREGATE, user.id, mapping.user_deactivated(user, cmd.reason))
            await uow.commit()
    return user


async def activate_user(cmd: commands.ActivateUser, uow: UnitOfWork) -> User:
    user_id = check_id(cmd.user_id, "id")
    _require_admin("activating an account")
    async with uow:
        user = await uow.users.get_for_update(user_id)
        if user is None:
            raise _not_found(user_id)
        if user.activate(utcnow()):
            if not await uow.users.save(user):
                raise _not_found(user_id)
            uow.add_event(AGGREGATE, user.id, mapping.user_activated(user))
            await uow.commit()
    return user


def _require_admin(what: str) -> None:
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        raise PermissionDenied(f"{what} needs the admin scope", reason="PERMISSION_DENIED", domain=DOMAIN)
