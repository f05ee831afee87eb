"""The order repository's saga leases on SQLite and PostgreSQL: one runner per saga, fenced writes, recovery."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
from alembic import command
from sqlalchemy import func, insert, inspect, select, text
from tessera.order.v1 import order_events_pb2

from tessera_order import bootstrap
from tessera_order.adapters.orm import order_sagas, orders, outbox
from tessera_order.adapters.repository import (
    DuplicateRequestId,
    Lease,
    LeaseLost,
    SagaCaller,
    SqlAlchemyOrderRepository,
    _order_row,
)
from tessera_order.domain.model import Failure, Order, OrderItem, OrderStatus, StepName
from tessera_order.service_layer.unit_of_work import OrderUnitOfWork
from tessera_runtime import migrations
from tessera_runtime.db import Database, utcnow
from tessera_runtime.migrations import upgrade_async
from tests.support.databases import migrated


@pytest.fixture
async def db(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as database:
        yield database


async def claimable_ids(uow: OrderUnitOfWork) -> list[str]:
    return [order_id for _, order_id in await uow.orders.claimable(utcnow(), 10)]


def lease(owner: str, seconds: float = 30) -> Lease:
    return Lease(owner, utcnow() + dt.timedelta(seconds=seconds))


async def stored_order(db: Database, owner: str = "runner-a", seconds: float = 30,
                       caller: SagaCaller = SagaCaller()) -> Order:
    order = Order.place(customer_id=str(uuid.uuid4()), items=(OrderItem(str(uuid.uuid4()), "Pen", "PEN", 2, 150),),
                        currency_code="EUR", payment_method="pm", request_id=uuid.uuid4().hex, request_hash="h",
                        now=utcnow())
    async with OrderUnitOfWork(db) as uow:
        await uow.orders.add(order, lease(owner, seconds), caller)
        await uow.commit()
    return order


async def test_a_held_lease_fences_every_other_runner(db):
    order = await stored_order(db, owner="runner-a")
    async with OrderUnitOfWork(db) as uow:
        assert not await uow.orders.acquire_lease(order.id, lease("runner-b"), utcnow())
        assert await uow.orders.acquire_lease(order.id, lease("runner-a"), utcnow()), "the holder may renew"
        await uow.commit()
    order.start_step(StepName.RESERVE_STOCK, utcnow())
    async with OrderUnitOfWork(db) as uow:
        with pytest.raises(LeaseLost):
            await uow.orders.save(order, lease("runner-b"))
    async with OrderUnitOfWork(db) as uow:
        await uow.orders.save(order, lease("runner-a"))
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        stored = await uow.orders.get(order.id)
    assert stored.version == 2 and stored.steps[StepName.RESERVE_STOCK].attempts == 1
    assert stored.current_step is StepName.RESERVE_STOCK


async def test_an_expired_lease_is_taken_over_and_the_old_runner_can_no_longer_write(db):
    order = await stored_order(db, owner="runner-a", seconds=-1)
    async with OrderUnitOfWork(db) as uow:
        assert await claimable_ids(uow) == [order.id]
        assert await uow.orders.acquire_lease(order.id, lease("runner-b"), utcnow())
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        assert await claimable_ids(uow) == []
    order.start_step(StepName.RESERVE_STOCK, utcnow())
    async with OrderUnitOfWork(db) as uow:
        with pytest.raises(LeaseLost):
            await uow.orders.save(order, lease("runner-a"))
    async with OrderUnitOfWork(db) as uow:
        fresh = await uow.orders.get(order.id)
        await uow.orders.save(fresh, lease("runner-b"))
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        with pytest.raises(LeaseLost):  # an outdated copy is refused even for the holder
            await uow.orders.save(order, lease("runner-b"))


async def test_of_many_runners_racing_for_an_expired_lease_exactly_one_wins(db):
    order = await stored_order(db, seconds=-1)

    async def try_acquire(owner: str) -> bool:
        async with OrderUnitOfWork(db) as uow:
            won = await uow.orders.acquire_lease(order.id, lease(owner), utcnow())
            await uow.commit()
        return won

    results = await asyncio.gather(*(try_acquire(f"runner-{i}") for i in range(6)))
    assert results.count(True) == 1


async def test_released_leases_make_unfinished_sagas_claimable_with_their_caller(db):
    caller = SagaCaller(subject="customer-1", scopes=("orders", "read"), correlation_id="corr-9",
                        traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", tracestate="tessera=1,o=2")
    first = await stored_order(db, owner="runner-a", caller=caller)
    second = await stored_order(db, owner="runner-a")
    async with OrderUnitOfWork(db) as uow:
        assert await claimable_ids(uow) == []
        assert await uow.orders.release_leases("runner-a") == 2
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        assert set(await claimable_ids(uow)) == {first.id, second.id}
        keys = await uow.orders.claimable(utcnow(), 10)
        assert keys == sorted(keys), "least recently changed first"
        assert await uow.orders.claimable(utcnow(), 10, after=keys[0]) == keys[1:], "the recovery's next batch"
        assert await uow.orders.caller(first.id) == caller
        finished = await uow.orders.get(second.id)
    for step in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT, StepName.CONFIRM_ORDER):
        finished.start_step(step, utcnow())
        if step is StepName.CONFIRM_ORDER:
            finished.confirm(utcnow())
        else:
            finished.complete_step(step, utcnow())
    async with OrderUnitOfWork(db) as uow:
        assert await uow.orders.acquire_lease(second.id, lease("runner-b"), utcnow())
        await uow.orders.save(finished, lease("runner-b"))
        await uow.orders.release_lease(second.id, "runner-b")
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        assert await claimable_ids(uow) == [first.id], "a CONFIRMED order has nothing to resume"
        assert (await uow.orders.get(second.id)).status is OrderStatus.CONFIRMED


async def test_a_resumed_saga_acts_with_the_scopes_its_caller_had(db):
    """A scope is what lies between spaces (as the gateway and the services read x-user-scopes): a caller's
    "admin\tx" is stored and read back as that one scope, so a resumed saga never acts as admin for it."""
    caller = SagaCaller(subject="customer-1", scopes=("admin\tx", "order:write"))
    order = await stored_order(db, caller=caller)
    async with OrderUnitOfWork(db) as uow:
        stored = await uow.orders.caller(order.id)
    assert stored.scopes == ("admin\tx", "order:write")
    assert "admin" not in stored.scopes


async def test_a_saga_stored_before_migration_0002_resumes_without_a_trace_context(db_url):
    """Rows written by revision 0001 get NULL trace columns and read back as a caller without a trace context
    (the saga resumes in a new trace); the migration also goes down again on both databases."""
    await asyncio.to_thread(migrations.upgrade, bootstrap.MIGRATIONS, db_url, "0001")
    order = Order.place(customer_id=str(uuid.uuid4()), items=(OrderItem(str(uuid.uuid4()), "Pen", "PEN", 1, 150),),
                        currency_code="EUR", payment_method="pm", request_id=uuid.uuid4().hex, request_hash="h",
                        now=utcnow())
    database = Database(db_url)
    try:
        async with database.engine.begin() as conn:  # only the columns revision 0001 has
            await conn.execute(insert(orders).values(id=order.id, version=order.version, **_order_row(order)))
            await conn.execute(insert(order_sagas).values(
                order_id=order.id, current_step=order.current_step.value, principal_subject="customer-1",
                principal_scopes="orders", correlation_id="corr-0"))
        await upgrade_async(bootstrap.MIGRATIONS, db_url)
        async with OrderUnitOfWork(database) as uow:
            assert await claimable_ids(uow) == [order.id]
            assert await uow.orders.caller(order.id) == SagaCaller(subject="customer-1", scopes=("orders",),
                                                                   correlation_id="corr-0")
    finally:
        await database.dispose()
    await asyncio.to_thread(command.downgrade, migrations.alembic_config(bootstrap.MIGRATIONS, db_url), "0001")
    database = Database(db_url)
    try:
        async with database.engine.connect() as conn:
            columns = await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("order_sagas")})
        assert "correlation_id" in columns and not columns & {"traceparent", "tracestate"}
    finally:
        await database.dispose()


def opened(uow: OrderUnitOfWork, inserting: bool) -> OrderUnitOfWork:
    return uow.inserting() if inserting else uow


# An add in an ordinary unit of work inserts at once; in an inserting() one (CreateOrder's) it is staged and written
# at commit, on PostgreSQL as one statement with the events.
ADD_MODES = pytest.mark.parametrize("inserting", [False, True], ids=["at-once", "inserting"])


@ADD_MODES
async def test_request_id_is_unique(db, inserting):
    order = await stored_order(db)
    twin = Order.place(customer_id=order.customer_id, items=order.items, currency_code="EUR", payment_method="pm",
                       request_id=order.request_id, request_hash="h", now=utcnow())
    async with opened(OrderUnitOfWork(db), inserting) as uow:
        with pytest.raises(DuplicateRequestId):
            await uow.orders.add(twin, lease("runner-b"), SagaCaller())
            uow.add_event("order", twin.id, order_events_pb2.OrderCreated())
            await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        assert await uow.orders.get(twin.id) is None
    async with db.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(outbox))).scalar() == 0


@ADD_MODES
async def test_an_order_with_many_items_is_stored_and_read_back_whole(db, inserting):
    items = tuple(OrderItem(str(uuid.uuid4()), f"Item {i}", f"SKU-{i}", i + 1, 100 * (i + 1)) for i in range(7))
    order = Order.place(customer_id=str(uuid.uuid4()), items=items, currency_code="EUR", payment_method="pm",
                        request_id=uuid.uuid4().hex, request_hash="h", now=utcnow())
    caller = SagaCaller(subject="customer-1", scopes=("orders",), correlation_id="corr-1")
    async with opened(OrderUnitOfWork(db), inserting) as uow:
        await uow.orders.add(order, lease("runner-a"), caller)
        uow.add_event("order", order.id, order_events_pb2.OrderCreated())
        await uow.commit()
    if inserting and db.dialect == "postgresql":  # the order, its items, saga, steps and event: one statement
        assert db.engine.sync_engine.pool.checkedin() == 0  # on the direct pool: the engine's was never used
        async with db.engine.connect() as conn:
            xmins = (await conn.execute(text(
                "SELECT xmin::text FROM orders UNION ALL SELECT xmin::text FROM order_items UNION ALL "
                "SELECT xmin::text FROM order_sagas UNION ALL SELECT xmin::text FROM order_saga_steps UNION ALL "
                "SELECT xmin::text FROM outbox"))).scalars().all()
        assert len(set(xmins)) == 1 and len(xmins) == 1 + 7 + 1 + len(order.steps) + 1
    async with OrderUnitOfWork(db) as uow:
        stored = await uow.orders.get(order.id)
        assert await uow.orders.caller(order.id) == caller
        assert await uow.orders.id_by_request_id(order.request_id) == order.id
        assert await uow.orders.id_by_request_id("unknown") is None
    async with OrderUnitOfWork(db).reading() as uow:  # CreateOrder's first read (straight on asyncpg on PostgreSQL)
        assert await uow.orders.id_by_request_id(order.request_id) == order.id
        assert await uow.orders.id_by_request_id("unknown") is None
    assert stored == order and stored.items == items


async def test_each_save_writes_the_steps_that_changed_and_the_last_one_frees_the_lease(db):
    order = await stored_order(db, owner="runner-a")
    order.start_step(StepName.RESERVE_STOCK, utcnow())
    for step in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT, StepName.CONFIRM_ORDER):
        if step is StepName.CONFIRM_ORDER:
            order.confirm(utcnow())
        else:
            order.complete_step(step, utcnow(), reservation_id="r-1", payment_id="p-1")
            order.start_step(order.next_step(), utcnow())  # the next step, started in the same save
        async with OrderUnitOfWork(db) as uow:
            await uow.orders.save(order, lease("runner-a"), release=step is StepName.CONFIRM_ORDER)
            await uow.commit()
        async with OrderUnitOfWork(db) as uow:
            assert await uow.orders.get(order.id) == order
    async with OrderUnitOfWork(db) as uow:
        stored = await uow.orders.get(order.id)
        # Free: anyone may take the lease now, and the former holder can no longer write.
        assert await uow.orders.acquire_lease(order.id, lease("runner-b"), utcnow())
        await uow.commit()
    assert stored.status is OrderStatus.CONFIRMED and stored.version == 4
    assert [s.attempts for s in stored.steps.values()] == [1] * 5
    stored.cancel_reason = "late write"
    async with OrderUnitOfWork(db) as uow:
        with pytest.raises(LeaseLost):
            await uow.orders.save(stored, lease("runner-a"))



# The saga's saves are one_statement() units of work: on PostgreSQL the fenced UPDATEs and the events are one
# statement, the events written only if the fences held; elsewhere one transaction.

async def outbox_events(db: Database) -> list[tuple[str, str]]:
    async with db.engine.connect() as conn:
        return [(r.aggregate_id, r.event_type) for r in (await conn.execute(
            select(outbox.c.aggregate_id, outbox.c.event_type).order_by(outbox.c.seq))).all()]


async def test_a_one_statement_save_writes_the_order_its_steps_and_its_events_in_order_at_once(db):
    order = await stored_order(db, owner="runner-a")
    order.complete_step(StepName.RESERVE_STOCK, utcnow(), reservation_id="r-1")
    order.start_step(order.next_step(), utcnow())
    events = [order_events_pb2.OrderConfirmed(order_id=order.id), order_events_pb2.OrderCancelled(order_id=order.id),
              order_events_pb2.OrderFailed(order_id=order.id)]
    await db.engine.dispose()  # the engine's pool starts empty: a direct save does not use it
    async with OrderUnitOfWork(db).one_statement() as uow:
        await uow.orders.save(order, lease("runner-a"))
        for event in events:
            uow.add_event("order", order.id, event)
        await uow.commit()
    if db.dialect == "postgresql":
        assert db.engine.sync_engine.pool.checkedin() == 0  # on the direct pool: one statement
        async with db.engine.connect() as conn:
            xmins = (await conn.execute(text(
                "SELECT xmin::text FROM orders UNION ALL SELECT xmin::text FROM order_sagas UNION ALL "
                "SELECT xmin::text FROM order_saga_steps WHERE step IN ('RESERVE_STOCK', 'PROCESS_PAYMENT') "
                "UNION ALL SELECT xmin::text FROM outbox WHERE event_type <> 'tessera.order.v1.OrderCreated'"
            ))).scalars().all()
        assert len(xmins) == 1 + 1 + 2 + 3 and len(set(xmins)) == 1  # one transaction wrote them all
    async with OrderUnitOfWork(db) as uow:
        assert await uow.orders.get(order.id) == order
    assert [t for _, t in await outbox_events(db)] == [
        "tessera.order.v1.OrderConfirmed", "tessera.order.v1.OrderCancelled", "tessera.order.v1.OrderFailed"]


@pytest.mark.parametrize("fence", ["lease", "version"])
async def test_a_one_statement_save_that_lost_its_fence_writes_nothing_and_commit_raises_lease_lost(db, fence):
    order = await stored_order(db, owner="runner-a")
    stale = await stored_order_copy(db, order.id)
    if fence == "version":  # another save by the holder came first, and moved the saga to its next step
        order.start_step(StepName.RESERVE_STOCK, utcnow())
        order.complete_step(StepName.RESERVE_STOCK, utcnow(), reservation_id="r-1")
        order.start_step(order.next_step(), utcnow())
        async with OrderUnitOfWork(db).one_statement() as uow:
            await uow.orders.save(order, lease("runner-a"))
            await uow.commit()
    before = await outbox_events(db)
    async with OrderUnitOfWork(db) as uow:
        stored_before = await uow.orders.get(order.id)
    # The stale save would move the saga to another step and, ending it, free the lease.
    stale.cancel_reason = "a write that must not land"
    stale.start_step(StepName.RESERVE_STOCK, utcnow())
    stale.fail(StepName.RESERVE_STOCK, Failure("INSUFFICIENT_STOCK", "stale", StepName.RESERVE_STOCK), utcnow())
    stale.current_step = StepName.CREATE_ORDER
    assert stale.current_step is not stored_before.current_step
    with pytest.raises(LeaseLost):
        async with OrderUnitOfWork(db).one_statement() as uow:
            await uow.orders.save(stale, lease("runner-a" if fence == "version" else "runner-b"), release=True)
            uow.add_event("order", order.id, order_events_pb2.OrderCancelled(order_id=order.id))
            await uow.commit()
    assert await outbox_events(db) == before  # no event
    async with OrderUnitOfWork(db) as uow:
        assert await uow.orders.get(order.id) == stored_before  # no change: order, saga and steps as they were
        assert not await uow.orders.acquire_lease(order.id, lease("runner-b"), utcnow())  # still held ...
        assert await uow.orders.acquire_lease(order.id, lease("runner-a"), utcnow())  # ... by runner-a


async def test_a_stale_save_that_waited_for_the_holder_s_save_writes_nothing_once_that_committed(pg_database):
    # The same runner saves one version twice at once (two calls in one process): the later statement waits for
    # the earlier one's lock, then must find the version changed, and write no step and free no lease.
    async with migrated(bootstrap.MIGRATIONS, pg_database[1]) as db:
        order = await stored_order(db, owner="runner-a")
        stale = await stored_order_copy(db, order.id)
        stale.start_step(StepName.RESERVE_STOCK, utcnow())
        stale.fail(StepName.RESERVE_STOCK, Failure("INSUFFICIENT_STOCK", "stale", StepName.RESERVE_STOCK), utcnow())
        stale.current_step = StepName.CREATE_ORDER
        order.start_step(StepName.RESERVE_STOCK, utcnow())
        order.complete_step(StepName.RESERVE_STOCK, utcnow(), reservation_id="r-1")
        order.start_step(order.next_step(), utcnow())

        async def stale_save() -> None:
            async with OrderUnitOfWork(db).one_statement() as uow:
                await uow.orders.save(stale, lease("runner-a"), release=True)
                await uow.commit()

        async with OrderUnitOfWork(db) as holder:
            await holder.orders.save(order, lease("runner-a"))  # written, locked, not yet committed
            waiting = asyncio.create_task(stale_save())
            async with db.engine.connect() as conn:
                # However slow the machine is to start the stale save (a connection of the direct pool to open),
                # it ends waiting on the holder's lock or done (which the assertion then reports).
                deadline = asyncio.get_running_loop().time() + 20
                while True:
                    blocked = (await conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"))).scalar_one()
                    # pg_stat_activity is read once per transaction: end this one, or every later poll would see
                    # the first poll's snapshot, taken perhaps before the stale save reached the lock.
                    await conn.rollback()
                    if blocked or waiting.done() or asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.02)
            assert blocked, ("the stale save did not wait for the holder's: "
                             + (f"it ended first with {waiting.exception()!r}" if waiting.done()
                                else "no statement waited on a lock within 20 s"))
            await holder.commit()
        with pytest.raises(LeaseLost):
            await waiting
        async with OrderUnitOfWork(db) as uow:
            assert await uow.orders.get(order.id) == order
            assert not await uow.orders.acquire_lease(order.id, lease("runner-b"), utcnow())  # still runner-a's


async def test_a_one_statement_save_after_a_read_in_the_same_block_is_one_transaction(db):
    order = await stored_order(db, owner="runner-a")
    async with OrderUnitOfWork(db).one_statement() as uow:
        fresh = await uow.orders.get(order.id)  # the block reads through its session: its save joins that
        fresh.start_step(StepName.RESERVE_STOCK, utcnow())
        await uow.orders.save(fresh, lease("runner-a"))
        uow.add_event("order", order.id, order_events_pb2.OrderConfirmed(order_id=order.id))
        await uow.commit()
    async with OrderUnitOfWork(db) as uow:
        assert await uow.orders.get(order.id) == fresh
    assert (await outbox_events(db))[-1] == (order.id, "tessera.order.v1.OrderConfirmed")
    if db.dialect == "postgresql":
        async with db.engine.connect() as conn:
            xmins = (await conn.execute(text(
                "SELECT xmin::text FROM orders UNION ALL SELECT xmin::text FROM outbox "
                "WHERE event_type = 'tessera.order.v1.OrderConfirmed'"))).scalars().all()
        assert len(xmins) == 2 and len(set(xmins)) == 1
    fresh.cancel_reason = "stale"
    with pytest.raises(LeaseLost):
        async with OrderUnitOfWork(db).one_statement() as uow:
            await uow.orders.get(order.id)
            await uow.orders.save(fresh, lease("runner-b"))
            uow.add_event("order", order.id, order_events_pb2.OrderCancelled(order_id=order.id))
            await uow.commit()
    assert [t for _, t in await outbox_events(db)][-1] == "tessera.order.v1.OrderConfirmed"


async def stored_order_copy(db: Database, order_id: str) -> Order:
    async with OrderUnitOfWork(db) as uow:
        order = await uow.orders.get(order_id)
    assert order is not None
    return order


@pytest.mark.parametrize("read", ["get", "list"])
async def test_a_read_while_the_saga_saves_shows_the_order_as_one_save_left_it(pg_database, monkeypatch, read):
    # GetOrder and ListOrders read the order row, then its items, steps and saga row, by statements of their own,
    # each seeing the saves committed before it (READ COMMITTED): a save committed between those reads (the saga
    # moving on) must not give an order in a state the saga never had, such as PENDING with every step done. (On
    # SQLite a transaction reads one snapshot.)
    async with migrated(bootstrap.MIGRATIONS, pg_database[1]) as db:
        await _read_while_the_saga_saves(db, monkeypatch, read)


async def _read_while_the_saga_saves(db: Database, monkeypatch, read: str) -> None:
    order = await stored_order(db, owner="runner-a")
    for step in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT, StepName.CONFIRM_ORDER):
        order.start_step(step, utcnow())
        if step is StepName.CONFIRM_ORDER:
            break
        order.complete_step(step, utcnow(), reservation_id="r-1", payment_id="p-1")
    async with OrderUnitOfWork(db) as uow:
        await uow.orders.save(order, lease("runner-a"))
        await uow.commit()
    before = await stored_order_copy(db, order.id)
    order.confirm(utcnow())
    real_load = SqlAlchemyOrderRepository._load
    saved = []

    async def load_after_the_saga_moved_on(self, rows, **kw):
        if not saved:  # the saga confirms the order between the read of its row and the rest
            saved.append(True)
            async with OrderUnitOfWork(db).one_statement() as uow:
                await uow.orders.save(order, lease("runner-a"), release=True)
                await uow.commit()
        return await real_load(self, rows, **kw)

    monkeypatch.setattr(SqlAlchemyOrderRepository, "_load", load_after_the_saga_moved_on)
    async with OrderUnitOfWork(db) as uow:
        if read == "get":
            seen = await uow.orders.get(order.id)
        else:
            [seen] = await uow.orders.list(customer_id=order.customer_id, status=None, after=None, limit=10)
    assert saved
    assert seen in (before, order), (seen.status, seen.version, {s.name.value: s.status.value
                                                                 for s in seen.steps.values()})
