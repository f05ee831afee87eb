"""User service use cases through the service layer, with the in-memory unit of work."""

from __future__ import annotations

import datetime as dt

import pytest

from tessera_runtime import context as callctx
from tessera_runtime.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from tessera_user.adapters.repository import DuplicateEmail
from tessera_user.domain.model import Preferences, Profile, UserStatus
from tessera_user.service_layer import commands, handlers
from tessera_user.service_layer.unit_of_work import FakeUserUnitOfWork


def create(email="ada@example.com", name="Ada", request_id="r-1", **kw) -> commands.CreateUser:
    return commands.CreateUser(email=email, display_name=name, profile=kw.pop("profile", Profile()),
                               preferences=kw.pop("preferences", Preferences()), request_id=request_id, **kw)


def fields(err: InvalidArgument) -> list[str]:
    return [v.field for v in err.violations]


async def test_create_normalises_email_and_records_event():
    uow = FakeUserUnitOfWork()
    user = await handlers.create_user(create(email="  Ada.L@Example.COM "), uow)
    assert user.email == "Ada.L@example.com"
    assert user.status is UserStatus.ACTIVE
    assert [type(e[2]).__name__ for e in uow.published] == ["UserCreated"]
    assert uow.published[0][2].user.id == user.id


async def test_same_request_id_returns_same_user_without_a_second_event():
    uow = FakeUserUnitOfWork()
    first = await handlers.create_user(create(), uow)
    again = await handlers.create_user(create(), uow)
    assert again.id == first.id
    assert len(uow.users.users) == 1
    assert len(uow.published) == 1


async def test_same_request_id_with_other_body_is_refused():
    uow = FakeUserUnitOfWork()
    await handlers.create_user(create(), uow)
    with pytest.raises(AlreadyExists) as err:
        await handlers.create_user(create(name="Someone else"), uow)
    assert err.value.reason == "REQUEST_ID_REUSED"


async def test_a_repeat_gets_the_first_answer_not_the_account_as_it_is_now():
    # The answer tells the caller only what it sent, with the id and time the first call gave: not the name the
    # customer changed since, nor the status an administrator set (the repeat has no right to read the account).
    uow = FakeUserUnitOfWork()
    first = await handlers.create_user(create(profile=Profile(given_name="Ada")), uow)
    await handlers.update_user(commands.UpdateUser(first.id, ("display_name", "profile.locale"), "Ada L.",
                                                   Profile(locale="en"), Preferences()), uow)
    await handlers.deactivate_user(commands.DeactivateUser(first.id, "fraud"), uow)
    again = await handlers.create_user(create(profile=Profile(given_name="Ada")), uow)
    assert again == first
    assert (again.display_name, again.status, again.version, again.profile.locale) == ("Ada", UserStatus.ACTIVE, 1, "")
    assert [type(e[2]).__name__ for e in uow.published] == ["UserCreated", "UserUpdated", "UserDeactivated"]


async def test_a_repeat_after_the_account_was_deleted_creates_no_second_account():
    uow = FakeUserUnitOfWork()
    first = await handlers.create_user(create(), uow)
    await handlers.delete_user(commands.DeleteUser(first.id), uow)
    again = await handlers.create_user(create(), uow)
    assert again == first
    assert uow.users.users == {}
    assert [type(e[2]).__name__ for e in uow.published] == ["UserCreated", "UserDeleted"]


async def test_a_forgotten_request_is_a_new_call():
    # Past the retention period a repeat is an ordinary create: refused while the account exists (its e-mail is
    # taken), a new account once it is gone.
    uow = FakeUserUnitOfWork()
    first = await handlers.create_user(create(), uow)
    await handlers.create_user(create(email="bob@example.com", request_id="r-2"), uow)
    assert await handlers.purge_create_requests(uow, dt.timedelta(0), batch=1) == 1
    assert set(uow.users.requests) == {"r-2"}, "the oldest record goes first"
    with pytest.raises(AlreadyExists) as err:
        await handlers.create_user(create(), uow)
    assert err.value.reason == "EMAIL_ALREADY_EXISTS"
    await handlers.delete_user(commands.DeleteUser(first.id), uow)
    assert (await handlers.create_user(create(), uow)).id != first.id


async def test_records_within_the_retention_period_are_kept():
    uow = FakeUserUnitOfWork()
    await handlers.create_user(create(), uow)
    assert await handlers.purge_create_requests(uow, dt.timedelta(hours=1), batch=10) == 0
    assert set(uow.users.requests) == {"r-1"}


async def test_duplicate_email_is_case_insensitive():
    uow = FakeUserUnitOfWork()
    await handlers.create_user(create(email="ada@example.com"), uow)
    with pytest.raises(AlreadyExists) as err:
        await handlers.create_user(create(email="ADA@EXAMPLE.com", request_id="r-2"), uow)
    assert err.value.reason == "EMAIL_ALREADY_EXISTS"


async def test_a_clash_with_a_row_that_vanishes_each_time_is_aborted_without_a_write():
    # The insert clashes, but the clashing account is gone before it can be read (deleted meanwhile), twice:
    # neither a replay nor an e-mail clash is true, so the caller is told to retry, and nothing was written.
    uow = FakeUserUnitOfWork()
    attempts = []

    async def clashing_add(user, request_id, request_hash):
        attempts.append(user.id)
        raise DuplicateEmail(user.email)

    uow.users.add = clashing_add
    with pytest.raises(Aborted) as err:
        await handlers.create_user(create(), uow)
    assert err.value.reason == "CONCURRENT_CREATE" and len(attempts) == 2
    assert uow.users.users == {} and uow.published == []


@pytest.mark.parametrize(("cmd", "field"), [
    (create(email=""), "user.email"),
    (create(email="no-at-sign"), "user.email"),
    (create(email="a@b"), "user.email"),
    (create(email="a" * 250 + "@example.com"), "user.email"),
    (create(name=" "), "user.display_name"),
    (create(name="x" * 101), "user.display_name"),
    (create(request_id=""), "request_id"),
    (create(request_id="x" * 65), "request_id"),
    (create(profile=Profile(phone_number="12345")), "user.profile.phone_number"),
    (create(profile=Profile(locale="english!")), "user.profile.locale"),
    (create(profile=Profile(time_zone="Not a zone")), "user.profile.time_zone"),
    (create(profile=Profile(given_name="x" * 101)), "user.profile.given_name"),
    (create(preferences=Preferences(preferred_currency_code="eur")), "user.preferences.preferred_currency_code"),
    (create(output_only_set=("status",)), "user.status"),
])
async def test_each_invalid_field_is_named_and_nothing_is_written(cmd, field):
    uow = FakeUserUnitOfWork()
    with pytest.raises(InvalidArgument) as err:
        await handlers.create_user(cmd, uow)
    assert fields(err.value) == [field]
    assert uow.users.users == {} and uow.commits == 0


async def test_update_applies_only_masked_paths():
    uow = FakeUserUnitOfWork()
    user = await handlers.create_user(create(profile=Profile(given_name="Ada", family_name="Lovelace")), uow)
    updated = await handlers.update_user(commands.UpdateUser(
        user_id=user.id, paths=("profile.family_name",), display_name="ignored",
        profile=Profile(given_name="ignored", family_name="King"), preferences=Preferences()), uow)
    assert updated.display_name == "Ada"
    assert updated.profile == Profile(given_name="Ada", family_name="King")
    assert updated.version == 2
    assert list(uow.published[-1][2].changed_paths) == ["profile.family_name"]


@pytest.mark.parametrize("path", ["email", "id", "status", "create_time", "version", "nickname", "profile.age"])
async def test_update_refuses_immutable_and_unknown_paths(path):
    uow = FakeUserUnitOfWork()
    user = await handlers.create_user(create(), uow)
    with pytest.raises(InvalidArgument) as err:
        await handlers.update_user(commands.UpdateUser(user.id, (path,), "Ada", Profile(), Preferences()), uow)
    assert fields(err.value) == ["update_mask"]
    assert path in err.value.violations[0].description


async def test_update_with_no_change_writes_nothing():
    uow = FakeUserUnitOfWork()
    user = await handlers.create_user(create(), uow)
    same = await handlers.update_user(commands.UpdateUser(user.id, ("display_name",), "Ada", Profile(),
                                                          Preferences()), uow)
    assert same.version == 1 and len(uow.published) == 1


async def test_deactivate_and_activate_are_idempotent():
    uow = FakeUserUnitOfWork()
    user = await handlers.create_user(create(), uow)
    deactivated = await handlers.deactivate_user(commands.DeactivateUser(user.id, "fraud"), uow)
    assert deactivated.status is UserStatus.INACTIVE
    await handlers.deactivate_user(commands.DeactivateUser(user.id, "again"), uow)
    assert [type(e[2]).__name__ for e in uow.published] == ["UserCreated", "UserDeactivated"]
    assert (await handlers.activate_user(commands.ActivateUser(user.id), uow)).status is UserStatus.ACTIVE
    await handlers.activate_user(commands.ActivateUser(user.id), uow)
    assert [type(e[2]).__name__ for e in uow.published][-1] == "UserActivated"
    assert len(uow.published) == 3


async def test_unknown_and_malformed_ids():
    uow = FakeUserUnitOfWork()
    with pytest.raises(NotFound) as err:
        await handlers.get_user(commands.GetUser("0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a"), uow)
    assert err.value.reason == "USER_NOT_FOUND"
    with pytest.raises(InvalidArgument) as bad:
        await handlers.get_user(commands.GetUser("42"), uow)
    assert fields(bad.value) == ["id"]
    with pytest.raises(NotFound):
        await handlers.delete_user(commands.DeleteUser("0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a"), uow)


async def test_customers_act_only_on_their_own_account():
    uow = FakeUserUnitOfWork()
    ada = await handlers.create_user(create(), uow)
    bob = await handlers.create_user(create(email="bob@example.com", name="Bob", request_id="r-2"), uow)
    token = callctx.principal_var.set(callctx.Principal(ada.id, frozenset({"user:read"})))
    try:
        assert (await handlers.get_user(commands.GetUser(ada.id), uow)).id == ada.id
        with pytest.raises(PermissionDenied):
            await handlers.get_user(commands.GetUser(bob.id), uow)
        with pytest.raises(PermissionDenied):
            await handlers.list_users(commands.ListUsers(10, "", None), uow)
        with pytest.raises(PermissionDenied):
            await handlers.deactivate_user(commands.DeactivateUser(ada.id, ""), uow)
    finally:
        callctx.principal_var.reset(token)
    admin = callctx.principal_var.set(callctx.Principal("ops", frozenset({"admin"})))
    try:
        assert (await handlers.get_user(commands.GetUser(bob.id), uow)).id == bob.id
    finally:
        callctx.principal_var.reset(admin)


async def test_paging_visits_every_user_once():
    uow = FakeUserUnitOfWork()
    ids = {(await handlers.create_user(create(email=f"u{i}@example.com", request_id=f"r{i}"), uow)).id
           for i in range(7)}
    seen, token = [], ""
    while True:
        page, token = await handlers.list_users(commands.ListUsers(3, token, None), uow)
        seen += [u.id for u in page]
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7


async def test_foreign_and_malformed_page_tokens_are_refused():
    uow = FakeUserUnitOfWork()
    for i in range(3):
        await handlers.create_user(create(email=f"u{i}@example.com", request_id=f"r{i}"), uow)
    _, token = await handlers.list_users(commands.ListUsers(1, "", None), uow)
    with pytest.raises(InvalidArgument) as foreign:
        await handlers.list_users(commands.ListUsers(1, token, UserStatus.INACTIVE), uow)
    assert fields(foreign.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as garbage:
        await handlers.list_users(commands.ListUsers(1, "not-a-token", None), uow)
    assert fields(garbage.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as negative:
        await handlers.list_users(commands.ListUsers(-1, "", None), uow)
    assert fields(negative.value) == ["page_size"]
