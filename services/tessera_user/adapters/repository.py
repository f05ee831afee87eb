"""User repositories: the SQLAlchemy one used by the service, an in-memory one for unit tests."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Integer, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_runtime.db import insert_row, keyset_page, read_first
from tessera_user.adapters.orm import create_requests, users
from tessera_user.domain.model import Preferences, Profile, User, UserStatus


class DuplicateEmail(Exception):
    """The e-mail address is already used by another account."""


class DuplicateRequestId(Exception):
    """Another create with the same request_id committed first."""


@dataclasses.dataclass(frozen=True, slots=True)
class CreateRequest:
    """A CreateUser answered: the account it created and when, and a hash of what it asked for."""

    request_id: str
    request_hash: str
    user_id: str
    create_time: dt.datetime


def email_key(email: str) -> str:
    return email.lower()


class UserRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, user: User, request_id: str, request_hash: str) -> None:
        """Adds the user and the record of the CreateUser that made it, together."""

    @abc.abstractmethod
    async def get(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    async def get_for_update(self, user_id: str) -> User | None:
        """The user, its row locked until the transaction ends (SELECT ... FOR UPDATE on PostgreSQL; a SQLite
        transaction that writes holds the whole database already): a change read this way cannot be lost to, or
        overwrite, a concurrent one."""

    @abc.abstractmethod
    async def get_create_request(self, request_id: str) -> CreateRequest | None:
        """The record of the CreateUser with this request_id, if one is kept (the account may be gone since)."""

    @abc.abstractmethod
    async def purge_create_requests(self, before: dt.datetime, limit: int) -> int:
        """Forgets at most `limit` CreateUser records made before `before`, oldest first; returns how many."""

    @abc.abstractmethod
    async def email_taken(self, email: str) -> bool: ...

    @abc.abstractmethod
    async def list_after(self, key: tuple[dt.datetime, str] | None, limit: int,
                         status: UserStatus | None) -> list[User]: ...

    @abc.abstractmethod
    async def save(self, user: User) -> bool:
        """Writes the user's changes; False when its row no longer exists."""

    @abc.abstractmethod
    async def delete(self, user_id: str) -> bool: ...


def _row(user: User) -> dict[str, Any]:
    return {
        "id": user.id, "email": user.email, "email_key": email_key(user.email),
        "display_name": user.display_name, "status": user.status.value,
        **dataclasses.asdict(user.profile), **dataclasses.asdict(user.preferences),
        "create_time": user.create_time, "update_time": user.update_time, "version": user.version,
    }


# GetUser's read, built once: tessera_runtime.db.read_first runs it straight on asyncpg in a read session.
_BY_ID = select(users).where(users.c.id == bindparam("user_id"))
_BY_ID_LOCKED = _BY_ID.with_for_update()
_CREATE_REQUEST = select(create_requests).where(create_requests.c.request_id == bindparam("request_id"))
# Oldest first, a batch at a time (by the create_time index), so one round never holds a long lock.
_PURGE_CREATE_REQUESTS = delete(create_requests).where(create_requests.c.request_id.in_(
    select(create_requests.c.request_id).where(create_requests.c.create_time < bindparam("before"))
    .order_by(create_requests.c.create_time).limit(bindparam("limit", type_=Integer))))


def _user(row: Any) -> User:
    m = row if isinstance(row, Mapping) else row._mapping
    return User(
        id=m["id"], email=m["email"], display_name=m["display_name"], status=UserStatus(m["status"]),
        profile=Profile(**{f.name: m[f.name] for f in dataclasses.fields(Profile)}),
        preferences=Preferences(**{f.name: m[f.name] for f in dataclasses.fields(Preferences)}),
        create_time=m["create_time"], update_time=m["update_time"], version=m["version"],
    )


class SqlAlchemyUserRepository(UserRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, user: User, request_id: str, request_hash: str) -> None:
        # No savepoint around the insert (two round trips fewer per create): after a duplicate the caller ends its
        # unit of work (create_user raises or starts a new one), so the spoiled transaction is only rolled back. In
        # an inserting() unit of work the row is written, and a clash raised, at commit.
        def clash(exc: IntegrityError) -> Exception | None:
            text = str(exc.orig).lower()
            if "request_id" in text:
                return DuplicateRequestId(request_id)
            if "email" in text:
                return DuplicateEmail(user.email)
            return None

        await insert_row(self.session, users, _row(user), clash)
        await insert_row(self.session, create_requests, {
            "request_id": request_id, "request_hash": request_hash, "user_id": user.id,
            "create_time": user.create_time}, clash)

    async def get(self, user_id: str) -> User | None:
        row = await read_first(self.session, _BY_ID, {"user_id": user_id})
        return None if row is None else _user(row)

    async def get_for_update(self, user_id: str) -> User | None:
        row = (await self.session.execute(_BY_ID_LOCKED, {"user_id": user_id})).first()
        return None if row is None else _user(row)

    async def get_create_request(self, request_id: str) -> CreateRequest | None:
        row = (await self.session.execute(_CREATE_REQUEST, {"request_id": request_id})).first()
        return None if row is None else CreateRequest(**row._mapping)

    async def purge_create_requests(self, before: dt.datetime, limit: int) -> int:
        result = await self.session.execute(_PURGE_CREATE_REQUESTS, {"before": before, "limit": limit})
        return result.rowcount

    async def email_taken(self, email: str) -> bool:
        row = (await self.session.execute(
            select(users.c.id).where(users.c.email_key == email_key(email)))).first()
        return row is not None

    async def list_after(self, key: tuple[dt.datetime, str] | None, limit: int,
                         status: UserStatus | None) -> list[User]:
        query = select(users)
        if status is not None:
            query = query.where(users.c.status == status.value)
        query = keyset_page(query, users, key, limit)
        return [_user(r) for r in (await self.session.execute(query)).all()]

    async def save(self, user: User) -> bool:
        values = _row(user)
        del values["id"], values["email"], values["email_key"], values["create_time"]
        result = await self.session.execute(update(users).where(users.c.id == user.id).values(**values))
        return result.rowcount == 1

    async def delete(self, user_id: str) -> bool:
        result = await self.session.execute(delete(users).where(users.c.id == user_id))
        return result.rowcount > 0


class InMemoryUserRepository(UserRepository):
    """Keeps users in a dict; shared across units of work of one FakeUnitOfWork."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.requests: dict[str, CreateRequest] = {}

    async def add(self, user: User, request_id: str, request_hash: str) -> None:
        if request_id in self.requests:
            raise DuplicateRequestId(request_id)
        if await self.email_taken(user.email):
            raise DuplicateEmail(user.email)
        self.users[user.id] = dataclasses.replace(user)
        self.requests[request_id] = CreateRequest(request_id, request_hash, user.id, user.create_time)

    async def get(self, user_id: str) -> User | None:
        user = self.users.get(user_id)
        return None if user is None else dataclasses.replace(user)

    async def get_for_update(self, user_id: str) -> User | None:
        return await self.get(user_id)  # one unit of work at a time: nothing to lock

    async def get_create_request(self, request_id: str) -> CreateRequest | None:
        return self.requests.get(request_id)

    async def purge_create_requests(self, before: dt.datetime, limit: int) -> int:
        due = sorted((r for r in self.requests.values() if r.create_time < before), key=lambda r: r.create_time)
        for record in due[:limit]:
            del self.requests[record.request_id]
        return len(due[:limit])

    async def email_taken(self, email: str) -> bool:
        return any(email_key(u.email) == email_key(email) for u in self.users.values())

    async def list_after(self, key: tuple[dt.datetime, str] | None, limit: int,
                         status: UserStatus | None) -> list[User]:
        ordered = sorted(self.users.values(), key=lambda u: (u.create_time, u.id))
        selected = [u for u in ordered if (status is None or u.status is status)
                    and (key is None or (u.create_time, u.id) > key)]
        return [dataclasses.replace(u) for u in selected[:limit]]

    async def save(self, user: User) -> bool:
        if user.id not in self.users:
            return False
        self.users[user.id] = dataclasses.replace(user)
        return True

    async def delete(self, user_id: str) -> bool:
        return self.users.pop(user_id, None) is not None
