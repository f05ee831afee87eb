"""The user service over a real channel to a real server on port 0, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select, text
from tessera.user.v1 import user_events_pb2, user_pb2
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime.clients import error_details
from tessera_runtime.db import Database
from tessera_user.adapters.orm import outbox, users


def new_user(email: str = "ada@example.com", name: str = "Ada", request_id: str | None = None,
             **fields) -> svc.CreateUserRequest:
    return svc.CreateUserRequest(user=user_pb2.User(email=email, display_name=name, **fields),
                                 request_id=request_id or uuid.uuid4().hex)


async def count_rows(db_url: str, table) -> int:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(table))).scalar_one()
    finally:
        await db.dispose()


async def test_crud_round_trip(user_stub, db_url):
    created = (await user_stub.CreateUser(new_user(profile=user_pb2.Profile(given_name="Ada", locale="en")))).user
    assert created.status == user_pb2.USER_STATUS_ACTIVE and created.version == 1
    assert created.preferences.order_update_emails  # the documented default when preferences are omitted
    got = (await user_stub.GetUser(svc.GetUserRequest(id=created.id))).user
    assert got == created

    updated = (await user_stub.UpdateUser(svc.UpdateUserRequest(
        user=user_pb2.User(id=created.id, display_name="Ada L.", profile=user_pb2.Profile(time_zone="Europe/London")),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "profile.time_zone"])))).user
    assert (updated.display_name, updated.profile.time_zone, updated.profile.given_name) == (
        "Ada L.", "Europe/London", "Ada")
    assert updated.version == 2 and updated.update_time.ToDatetime() > created.update_time.ToDatetime()

    inactive = (await user_stub.DeactivateUser(svc.DeactivateUserRequest(id=created.id, reason="test"))).user
    assert inactive.status == user_pb2.USER_STATUS_INACTIVE
    listed = await user_stub.ListUsers(svc.ListUsersRequest(status=user_pb2.USER_STATUS_INACTIVE))
    assert [u.id for u in listed.users] == [created.id]
    active = (await user_stub.ActivateUser(svc.ActivateUserRequest(id=created.id))).user
    assert active.status == user_pb2.USER_STATUS_ACTIVE

    await user_stub.DeleteUser(svc.DeleteUserRequest(id=created.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.GetUser(svc.GetUserRequest(id=created.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    kinds = await _event_types(db_url)
    assert kinds == ["UserCreated", "UserUpdated", "UserDeactivated", "UserActivated", "UserDeleted"]


async def _event_types(db_url: str) -> list[str]:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            rows = (await conn.execute(select(outbox.c.event_type).order_by(outbox.c.seq))).all()
    finally:
        await db.dispose()
    return [r[0].rsplit(".", 1)[1] for r in rows]


async def test_outbox_row_is_the_event_of_the_change(user_stub, db_url):
    created = (await user_stub.CreateUser(new_user())).user
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            row = (await conn.execute(select(outbox))).one()._mapping
    finally:
        await db.dispose()
    assert row["event_type"] == "tessera.user.v1.UserCreated"
    assert row["aggregate_id"] == created.id and row["published_at"] is None
    assert user_events_pb2.UserCreated.FromString(row["payload"]).user == created


async def test_request_and_correlation_ids_are_returned(user_stub):
    call = user_stub.CreateUser(new_user(), metadata=(("x-request-id", "req-123"),))
    await call
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "req-123" and trailing["x-correlation-id"] == "req-123"
    generated = user_stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await generated
    # On an error too, next to the status details.
    trailing = dict(failed.value.trailing_metadata())
    assert len(trailing["x-request-id"]) == 32 and trailing["x-correlation-id"] == trailing["x-request-id"]
    assert "grpc-status-details-bin" in trailing


BAD_CREATES = [
    (new_user(email="not-an-email"), "user.email"),
    (new_user(email=""), "user.email"),
    # A line break before the end of a part would pass a pattern's "$"; no address, phone or locale has one.
    (new_user(email="ada\n@example.com"), "user.email"),
    (new_user(name=""), "user.display_name"),
    (new_user(request_id="x" * 65), "request_id"),
    (new_user(profile=user_pb2.Profile(phone_number="0301234")), "user.profile.phone_number"),
    (new_user(preferences=user_pb2.Preferences(preferred_currency_code="ABC")),
     "user.preferences.preferred_currency_code"),
    (new_user(id="0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a"), "user.id"),
    # A name may be left empty, but a name of nothing but spaces (of any script) names nobody.
    (new_user(profile=user_pb2.Profile(given_name="   ")), "user.profile.given_name"),
    (new_user(profile=user_pb2.Profile(family_name="\u3000\u00a0")), "user.profile.family_name"),
    # Not BCP 47: a singleton with no subtag after it, an empty subtag, a subtag of nine characters, no language.
    (new_user(profile=user_pb2.Profile(locale="en-u")), "user.profile.locale"),
    (new_user(profile=user_pb2.Profile(locale="en--US")), "user.profile.locale"),
    (new_user(profile=user_pb2.Profile(locale="de-abcdefghi")), "user.profile.locale"),
    (new_user(profile=user_pb2.Profile(locale="1-DE")), "user.profile.locale"),
    (new_user(profile=user_pb2.Profile(locale="en_US")), "user.profile.locale"),
    # Not in the IANA time zone database: shaped like a name, a path, a file of the system's zoneinfo folder.
    (new_user(profile=user_pb2.Profile(time_zone="Europe/Atlantis")), "user.profile.time_zone"),
    (new_user(profile=user_pb2.Profile(time_zone="Europe/../Europe/Berlin")), "user.profile.time_zone"),
    (new_user(profile=user_pb2.Profile(time_zone="europe/berlin")), "user.profile.time_zone"),
    (new_user(profile=user_pb2.Profile(time_zone="localtime")), "user.profile.time_zone"),
    (new_user(status=user_pb2.USER_STATUS_INACTIVE), "user.status"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_CREATES, ids=[f for _, f in BAD_CREATES])
async def test_invalid_field_is_named_and_nothing_is_written(user_stub, db_url, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.CreateUser(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details(err.value)
    assert info is not None and (info.reason, info.domain) == ("INVALID_ARGUMENT", "user.tessera.dev")
    assert bad is not None and [v.field for v in bad.field_violations] == [field]
    assert await count_rows(db_url, users) == 0
    assert await count_rows(db_url, outbox) == 0


# BCP 47 tags beyond language-region (script, variant, extension, private use, grandfathered) and IANA zone names
# outside Area/Location (the POSIX-style and Etc zones the database keeps).
GOOD_PROFILES = [
    ("en-u-ca-gregory", "EST5EDT"), ("zh-Hant-TW", "GMT0"), ("de-CH-1996", "Etc/GMT+5"),
    ("sl-rozaj-biske", "America/Argentina/Buenos_Aires"), ("en-US-x-twain", "UTC"), ("i-klingon", "Etc/UTC"),
    ("x-whatever", "America/Port-au-Prince"), ("es-419", "CST6CDT"), ("sr-Latn-RS-u-nu-latn-t-en", "Asia/Kolkata"),
]


@pytest.mark.parametrize(("locale", "time_zone"), GOOD_PROFILES, ids=[f"{a}|{b}" for a, b in GOOD_PROFILES])
async def test_any_bcp47_locale_and_iana_time_zone_is_kept(user_stub, locale, time_zone):
    created = (await user_stub.CreateUser(new_user(profile=user_pb2.Profile(locale=locale, time_zone=time_zone))))
    assert (created.user.profile.locale, created.user.profile.time_zone) == (locale, time_zone)
    got = (await user_stub.GetUser(svc.GetUserRequest(id=created.user.id))).user
    assert (got.profile.locale, got.profile.time_zone) == (locale, time_zone)


async def test_update_refuses_a_name_of_only_spaces_and_changes_nothing(user_stub):
    created = (await user_stub.CreateUser(new_user(profile=user_pb2.Profile(given_name="Ada")))).user
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.UpdateUser(svc.UpdateUserRequest(
            user=user_pb2.User(id=created.id, profile=user_pb2.Profile(given_name=" ", family_name="Lovelace")),
            update_mask=field_mask_pb2.FieldMask(paths=["profile.given_name", "profile.family_name"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(err.value)
    assert [v.field for v in bad.field_violations] == ["user.profile.given_name"]
    assert (await user_stub.GetUser(svc.GetUserRequest(id=created.id))).user == created


async def test_update_refuses_immutable_paths_and_changes_nothing(user_stub):
    created = (await user_stub.CreateUser(new_user())).user
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.UpdateUser(svc.UpdateUserRequest(
            user=user_pb2.User(id=created.id, email="other@example.com", display_name="Changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["email", "display_name"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = error_details(err.value)
    assert [v.field for v in bad.field_violations] == ["update_mask"]
    assert (await user_stub.GetUser(svc.GetUserRequest(id=created.id))).user == created


async def test_duplicate_email_and_unknown_id(user_stub):
    await user_stub.CreateUser(new_user(email="dup@example.com"))
    with pytest.raises(grpc.aio.AioRpcError) as dup:
        await user_stub.CreateUser(new_user(email="DUP@example.com"))
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(dup.value)[0].reason == "EMAIL_ALREADY_EXISTS"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await user_stub.DeactivateUser(svc.DeactivateUserRequest(id=str(uuid.uuid4())))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(missing.value)[0].reason == "USER_NOT_FOUND"


async def test_concurrent_creates_with_one_request_id_make_one_user(user_stub, db_url):
    request = new_user(request_id="same-key")
    replies = await asyncio.gather(*(user_stub.CreateUser(request) for _ in range(8)))
    assert len({r.user.id for r in replies}) == 1
    assert await count_rows(db_url, users) == 1
    assert await count_rows(db_url, outbox) == 1


async def test_paging_never_skips_or_repeats_under_concurrent_inserts(user_stub):
    existing = {(await user_stub.CreateUser(new_user(email=f"p{i}@example.com"))).user.id for i in range(25)}

    async def insert_more() -> set[str]:
        added = set()
        for i in range(15):
            added.add((await user_stub.CreateUser(new_user(email=f"late{i}@example.com"))).user.id)
        return added

    async def page_through() -> list[str]:
        seen, token = [], ""
        while True:
            reply = await user_stub.ListUsers(svc.ListUsersRequest(page_size=4, page_token=token))
            seen += [u.id for u in reply.users]
            token = reply.next_page_token
            if not token:
                return seen
            await asyncio.sleep(0)

    seen, added = await asyncio.gather(page_through(), insert_more())
    assert len(seen) == len(set(seen)), "a user was returned twice"
    assert existing <= set(seen), "a user that existed before paging started was skipped"
    assert set(seen) <= existing | added


async def test_page_token_of_another_filter_is_refused(user_stub):
    for i in range(3):
        await user_stub.CreateUser(new_user(email=f"t{i}@example.com"))
    token = (await user_stub.ListUsers(svc.ListUsersRequest(page_size=1))).next_page_token
    assert token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.ListUsers(svc.ListUsersRequest(page_size=1, page_token=token,
                                                       status=user_pb2.USER_STATUS_ACTIVE))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(err.value)[1].field_violations] == ["page_token"]
    big = await user_stub.ListUsers(svc.ListUsersRequest(page_size=100_000))
    assert len(big.users) == 3


async def test_list_refuses_a_status_the_contract_does_not_define(user_stub):
    await user_stub.CreateUser(new_user())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.ListUsers(svc.ListUsersRequest(status=99))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(err.value)[1].field_violations] == ["status"]


async def test_unexpected_failure_is_internal_without_internals(user_stub, db_url, caplog):
    created = (await user_stub.CreateUser(new_user())).user
    db = Database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP TABLE users"))
    finally:
        await db.dispose()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.GetUser(svc.GetUserRequest(id=created.id))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    info, _ = error_details(err.value)
    assert info.reason == "INTERNAL"
    assert "users" not in err.value.details().lower()
    assert any(r.exc_info and "unexpected error" in r.getMessage() for r in caplog.records)



async def test_ids_are_the_same_in_either_case(user_stub, db_url):
    """A UUID's letters may come in either case (RFC 4122): an account is found, changed and deleted by its id in
    upper case, as products, reservations and payments are."""
    created = (await user_stub.CreateUser(new_user())).user
    upper = created.id.upper()
    assert (await user_stub.GetUser(svc.GetUserRequest(id=upper))).user == created
    own = (("x-user-id", created.id), ("x-user-scopes", "user:read"))  # the customer, as the gateway names them
    assert (await user_stub.GetUser(svc.GetUserRequest(id=upper), metadata=own)).user == created
    updated = (await user_stub.UpdateUser(svc.UpdateUserRequest(
        user=user_pb2.User(id=upper, display_name="Ada L."),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))).user
    assert (updated.id, updated.display_name) == (created.id, "Ada L.")
    assert (await user_stub.DeactivateUser(svc.DeactivateUserRequest(id=upper))).user.id == created.id
    assert (await user_stub.ActivateUser(svc.ActivateUserRequest(id=upper))).user.id == created.id
    await user_stub.DeleteUser(svc.DeleteUserRequest(id=upper))
    assert await count_rows(db_url, users) == 0
    assert await _event_types(db_url) == ["UserCreated", "UserUpdated", "UserDeactivated", "UserActivated",
                                          "UserDeleted"]


async def test_names_may_hold_the_spaces_and_joiners_of_any_script(user_stub, db_url):
    """A name may hold a space of any script (the ideographic space of Japanese names, a no-break space) and the
    zero-width joiners scripts and emoji need; control characters, line breaks, direction overrides and a name of
    nothing else than spaces and joiners stay refused."""
    created = (await user_stub.CreateUser(new_user(
        name="山田\u3000太郎", profile=user_pb2.Profile(given_name="Anne\u00a0Marie", family_name="O\u200dNeil")))).user
    assert (created.display_name, created.profile.given_name) == ("山田\u3000太郎", "Anne\u00a0Marie")
    renamed = (await user_stub.UpdateUser(svc.UpdateUserRequest(
        user=user_pb2.User(id=created.id, display_name="\U0001f468\u200d\U0001f469\u200d\U0001f467 Yamada"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))).user
    assert renamed.display_name == "\U0001f468\u200d\U0001f469\u200d\U0001f467 Yamada"
    for name in ("Ada\nLovelace", "Ada\u2028Lovelace", "Ada\u202eecalevoL", "Ada\x07", "\u3000\u200d"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_stub.CreateUser(new_user(email="other@example.com", name=name))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert [v.field for v in error_details(err.value)[1].field_violations] == ["user.display_name"]
    assert await count_rows(db_url, users) == 1


async def test_an_address_under_an_internationalised_top_level_domain_is_accepted(user_stub):
    """Top-level domains such as .рф and .中国 are written xn--p1ai and xn--fiqs8s in an address's ASCII form."""
    created = (await user_stub.CreateUser(new_user(email="ivan@xn--e1afmkfd.xn--p1ai"))).user
    assert created.email == "ivan@xn--e1afmkfd.xn--p1ai"
    assert (await user_stub.CreateUser(new_user(email="li@example.XN--FIQS8S"))).user.email == "li@example.xn--fiqs8s"
    for email in ("ivan@example.xn--", "ivan@example.c0m"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_stub.CreateUser(new_user(email=email))
        assert [v.field for v in error_details(err.value)[1].field_violations] == ["user.email"], email


async def test_an_update_mask_too_large_to_quote_gets_its_error(user_stub):
    """An update_mask path is quoted in its violation: one path of 20,000 characters, or 2,000 unknown paths, still
    give INVALID_ARGUMENT naming update_mask (not RESOURCE_EXHAUSTED from a trailer the client refuses)."""
    created = (await user_stub.CreateUser(new_user())).user
    for paths in (["\U0001f4a5" * 20_000], [f"no_such_field_{i}" for i in range(2000)]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_stub.UpdateUser(svc.UpdateUserRequest(user=user_pb2.User(id=created.id, display_name="B"),
                                                             update_mask=field_mask_pb2.FieldMask(paths=paths)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        info, bad = error_details(err.value)
        assert info.reason == "INVALID_ARGUMENT" and {v.field for v in bad.field_violations} == {"update_mask"}
    assert (await user_stub.GetUser(svc.GetUserRequest(id=created.id))).user == created
