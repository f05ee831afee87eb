"""Changes to one account at the same moment, on each backend: none is lost, and none is reported done on an
account that was deleted meanwhile.

Each writer, about to write, waits (up to a second) until the other has got as far: unless a change holds the
account from its read to its commit, both read the same version and the later write undoes the earlier one."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from tessera_runtime.db import Database
from tessera_runtime.errors import NotFound
from tessera_user import bootstrap
from tessera_user.adapters import repository
from tessera_user.adapters.orm import outbox
from tessera_user.domain.model import Preferences, Profile, UserStatus
from tessera_user.service_layer import commands, handlers
from tessera_user.service_layer.unit_of_work import UserUnitOfWork
from tests.support.concurrency import meet_before
from tests.support.databases import migrated


@pytest.fixture
async def db(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as database:
        yield database


def writers_meet_before_writing(monkeypatch) -> None:
    meet_before(monkeypatch, repository.SqlAlchemyUserRepository, "save")


async def create(db: Database, email: str = "ada@example.com"):
    return await handlers.create_user(commands.CreateUser(
        email=email, display_name="Ada", profile=Profile(given_name="Ada"), preferences=Preferences(),
        request_id=f"create-{email}"), UserUnitOfWork(db))


async def read(db: Database, user_id: str):
    async with UserUnitOfWork(db).reading() as uow:
        return await uow.users.get(user_id)


async def events_of(db: Database, user_id: str) -> list[str]:
    async with db.engine.connect() as conn:
        return [r[0].rsplit(".", 1)[1] for r in (await conn.execute(
            select(outbox.c.event_type).where(outbox.c.aggregate_id == user_id).order_by(outbox.c.seq))).all()]


async def test_two_updates_of_different_fields_at_once_both_stick(db, monkeypatch):
    user = await create(db)
    writers_meet_before_writing(monkeypatch)
    await asyncio.gather(
        handlers.update_user(commands.UpdateUser(user.id, ("display_name",), "Ada L.", Profile(), Preferences()),
                             UserUnitOfWork(db)),
        handlers.update_user(commands.UpdateUser(user.id, ("profile.time_zone",), "",
                                                 Profile(time_zone="Europe/London"), Preferences()),
                             UserUnitOfWork(db)))
    now = await read(db, user.id)
    assert (now.display_name, now.profile.time_zone, now.profile.given_name, now.version) == (
        "Ada L.", "Europe/London", "Ada", 3)


async def test_a_deactivation_is_not_undone_by_a_profile_update_at_the_same_moment(db, monkeypatch):
    user = await create(db)
    writers_meet_before_writing(monkeypatch)
    deactivated, updated = await asyncio.gather(
        handlers.deactivate_user(commands.DeactivateUser(user.id, "fraud"), UserUnitOfWork(db)),
        handlers.update_user(commands.UpdateUser(user.id, ("display_name",), "Ada L.", Profile(), Preferences()),
                             UserUnitOfWork(db)))
    now = await read(db, user.id)
    assert deactivated.status is UserStatus.INACTIVE and updated.display_name == "Ada L."
    assert (now.status, now.display_name, now.version) == (UserStatus.INACTIVE, "Ada L.", 3)


async def test_an_update_racing_a_delete_is_never_reported_done_after_it(db, monkeypatch):
    """The update reads the account, the deletion comes, then the update writes: either the update lands first
    (and is then deleted with the account), or it finds the account gone; it never succeeds after the deletion."""
    user = await create(db, "bob@example.com")
    update_read, deleted = asyncio.Event(), asyncio.Event()
    real = repository.SqlAlchemyUserRepository.save

    async def save(self, u):
        update_read.set()
        try:  # the deletion, if it can happen before this update commits
            await asyncio.wait_for(deleted.wait(), timeout=1.0)
        except TimeoutError:
            pass
        return await real(self, u)

    monkeypatch.setattr(repository.SqlAlchemyUserRepository, "save", save)

    async def delete() -> None:
        await update_read.wait()
        await handlers.delete_user(commands.DeleteUser(user.id), UserUnitOfWork(db))
        deleted.set()

    updated, _ = await asyncio.gather(
        handlers.update_user(commands.UpdateUser(user.id, ("display_name",), "Bobby", Profile(), Preferences()),
                             UserUnitOfWork(db)), delete(), return_exceptions=True)
    assert await read(db, user.id) is None
    events = await events_of(db, user.id)
    if isinstance(updated, NotFound):
        assert events == ["UserCreated", "UserDeleted"]
    else:
        assert not isinstance(updated, BaseException), updated
        assert events == ["UserCreated", "UserUpdated", "UserDeleted"]
