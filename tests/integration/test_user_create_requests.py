"""CreateUser's repeats, on SQLite and PostgreSQL: the first answer for as long as the call is kept (even once the
account changed or was deleted), the records forgotten by the sweeper after the retention period, and revision 0002
moving the records of revision 0001 to their table and back."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from alembic import command
from google.protobuf import field_mask_pb2
from sqlalchemy import String, column, insert, inspect, select, table
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime import migrations
from tessera_runtime.clients import error_details
from tessera_runtime.db import Database, utcnow
from tessera_runtime.server import create_server
from tessera_user import bootstrap
from tessera_user.adapters.orm import create_requests, outbox, users
from tessera_user.domain.model import Preferences, Profile
from tessera_user.service_layer import commands, handlers
from tessera_user.service_layer.unit_of_work import UserUnitOfWork
from tests.integration.test_user_service import count_rows, new_user

# The users table of revision 0001: today's columns and the two that kept the request on the account's row.
USERS_0001 = table("users", *(column(c.name, c.type) for c in users.c),
                   column("create_request_id", String), column("create_request_hash", String))


async def test_a_repeat_gets_the_first_answer_after_a_change_and_after_deletion(user_stub, db_url):
    request = new_user(profile=user_pb2.Profile(given_name="Ada"))
    created = (await user_stub.CreateUser(request)).user
    await user_stub.UpdateUser(svc.UpdateUserRequest(
        user=user_pb2.User(id=created.id, display_name="Ada L."),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    await user_stub.DeactivateUser(svc.DeactivateUserRequest(id=created.id, reason="test"))
    assert (await user_stub.CreateUser(request)).user == created, "the first answer, not the account as it is now"

    await user_stub.DeleteUser(svc.DeleteUserRequest(id=created.id))
    assert (await user_stub.CreateUser(request)).user == created, "no second account after a delete"
    assert await count_rows(db_url, users) == 0
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            kinds = (await conn.execute(select(outbox.c.event_type).order_by(outbox.c.seq))).scalars().all()
    finally:
        await db.dispose()
    assert [k.rsplit(".", 1)[1] for k in kinds] == ["UserCreated", "UserUpdated", "UserDeactivated", "UserDeleted"]


async def test_the_sweeper_forgets_calls_past_the_retention_period(db_url):
    settings = bootstrap.SETTINGS.from_env("user", 0, {
        "TESSERA_DATABASE_URL": db_url, "TESSERA_GRPC_PORT": "0", "TESSERA_OUTBOX_RELAY": "false",
        "TESSERA_CREATE_REQUEST_RETENTION_SECONDS": "1", "TESSERA_CREATE_REQUEST_SWEEP_SECONDS": "0.1"})
    server, port = await create_server(await bootstrap.build(settings), readiness_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            request = new_user()
            created = (await stub.CreateUser(request)).user
            assert (await stub.CreateUser(request)).user == created  # within the period: the first answer
            deadline = time.monotonic() + 30
            while await count_rows(db_url, create_requests):
                assert time.monotonic() < deadline, "the record was never forgotten"
                await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateUser(request)
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert error_details(err.value)[0].reason == "EMAIL_ALREADY_EXISTS"
            assert await count_rows(db_url, users) == 1
    finally:
        await server.stop()


async def test_revision_0002_moves_the_records_of_0001_and_back(db_url):
    await asyncio.to_thread(migrations.upgrade, bootstrap.MIGRATIONS, db_url, "0001")
    cmd = commands.CreateUser(email="ada@example.com", display_name="Ada", profile=Profile(),
                              preferences=Preferences(), request_id="before-0002")
    request_hash = handlers._request_hash(cmd, cmd.email)
    user_id, now = str(uuid.uuid4()), utcnow()
    row = dict(id=user_id, email="ada@example.com", email_key="ada@example.com", display_name="Ada",
               status="ACTIVE", given_name="", family_name="", phone_number="", locale="", time_zone="",
               marketing_emails=False, order_update_emails=True, preferred_currency_code="", create_time=now,
               update_time=now, version=1)
    database = Database(db_url)
    try:
        async with database.engine.begin() as conn:  # the users table of revision 0001, with its request columns
            await conn.execute(insert(USERS_0001).values(**row, create_request_id="before-0002",
                                                         create_request_hash=request_hash))
        await migrations.upgrade_async(bootstrap.MIGRATIONS, db_url)
        async with database.engine.connect() as conn:
            kept = (await conn.execute(select(create_requests))).one()._mapping
            columns = await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("users")})
        assert (kept["request_id"], kept["request_hash"], kept["user_id"], kept["create_time"]) == (
            "before-0002", request_hash, user_id, now)
        assert not columns & {"create_request_id", "create_request_hash"}
        again = await handlers.create_user(cmd, UserUnitOfWork(database))
        assert (again.id, again.create_time) == (user_id, now)
    finally:
        await database.dispose()

    await asyncio.to_thread(command.downgrade, migrations.alembic_config(bootstrap.MIGRATIONS, db_url), "0001")
    database = Database(db_url)
    try:
        async with database.engine.connect() as conn:
            back = (await conn.exec_driver_sql(
                "SELECT id, create_request_id, create_request_hash FROM users")).all()
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert [tuple(r) for r in back] == [(user_id, "before-0002", request_hash)]
        assert "user_create_requests" not in tables
    finally:
        await database.dispose()


async def test_a_repeat_that_spells_the_email_in_another_case_never_answers_with_its_spelling(user_stub):
    # The local part of an address keeps its case: a repeat spelled otherwise asks for another account than the
    # one the first call created, and must not be answered with an e-mail address the account never had.
    first = new_user()
    first.user.email = f"Ada.{uuid.uuid4().hex[:8]}@example.com"
    created = (await user_stub.CreateUser(first)).user
    repeat = svc.CreateUserRequest()
    repeat.CopyFrom(first)
    repeat.user.email = first.user.email.lower()
    try:
        answer = (await user_stub.CreateUser(repeat)).user
    except grpc.aio.AioRpcError as err:
        assert (err.code(), error_details(err)[0].reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    else:
        assert answer == created, "a replay is the first answer, with the e-mail address the account was given"
    assert (await user_stub.GetUser(svc.GetUserRequest(id=created.id))).user.email == first.user.email
