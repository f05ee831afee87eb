"""The shared saga engine (tessera_runtime.saga) with an in-memory store and scripted steps: the order steps run and
are compensated in, retries, waits, a compensation given up, a resume by another runner, and a lost lease."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import enum
import logging
from collections.abc import Mapping

import pytest

from tessera_runtime import metrics
from tessera_runtime.periodic import BacklogKey
from tessera_runtime.saga import (
    InMemorySagaLeases,
    Lease,
    Saga,
    SagaPolicy,
    SagaRunner,
    SagaStep,
    StepFailed,
    Undo,
)
from tessera_runtime.unit_of_work import FakeUnitOfWork

POLICY = SagaPolicy(step_max_attempts=3, compensation_max_attempts=3, initial_backoff_seconds=0.01,
                    max_backoff_seconds=1.0, lease_seconds=30.0)


class Leg(enum.Enum):
    FLIGHT = "FLIGHT"
    HOTEL = "HOTEL"
    CAR = "CAR"


class TripStatus(enum.Enum):
    BOOKING = "BOOKING"
    BOOKED = "BOOKED"
    COMPENSATING = "COMPENSATING"
    FAILED = "FAILED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


@dataclasses.dataclass
class Record:
    status: str = "PENDING"
    attempts: int = 0
    compensation_attempts: int = 0
    error: str = ""
    outcome_unknown: bool = False
    ids: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Failure:
    reason: str
    message: str


@dataclasses.dataclass
class Trip:
    """A saga state with the same rules as the order's, on three legs."""

    id: str
    status: TripStatus = TripStatus.BOOKING
    current_step: Leg = Leg.FLIGHT
    steps: dict[Leg, Record] = dataclasses.field(default_factory=lambda: {leg: Record() for leg in Leg})
    failure: Failure | None = None
    version: int = 1

    @property
    def finished(self) -> bool:
        return self.status not in (TripStatus.BOOKING, TripStatus.COMPENSATING)

    @property
    def compensating(self) -> bool:
        return self.status is TripStatus.COMPENSATING

    def next_step(self) -> Leg | None:
        if self.status is not TripStatus.BOOKING:
            return None
        return next((leg for leg in Leg if self.steps[leg].status == "PENDING"), None)

    def start_step(self, step: Leg, now: dt.datetime) -> None:
        self.steps[step].attempts += 1
        self.current_step = step

    def note_error(self, step: Leg, error: str, now: dt.datetime, *, outcome_unknown: bool = False) -> None:
        self.steps[step].error = error
        self.steps[step].outcome_unknown |= outcome_unknown

    def complete_step(self, step: Leg, now: dt.datetime, **ids: str) -> None:
        self.steps[step].status = "SUCCEEDED"
        self.steps[step].ids.update(ids)

    def complete(self, now: dt.datetime) -> None:
        self.steps[Leg.CAR].status = "SUCCEEDED"
        self.status = TripStatus.BOOKED

    def fail(self, step: Leg, failure: Failure, now: dt.datetime, *, outcome_unknown: bool = False,
             **ids: str) -> None:
        self.steps[step].status = "FAILED"
        self.steps[step].outcome_unknown |= outcome_unknown
        self.steps[step].ids.update(ids)
        self.failure = failure
        self.status = TripStatus.COMPENSATING

    def next_compensation(self) -> Leg | None:
        if self.status is not TripStatus.COMPENSATING:
            return None
        return next((leg for leg in reversed(Leg) if self.steps[leg].status == "SUCCEEDED"
                     or (self.steps[leg].status == "FAILED" and self.steps[leg].outcome_unknown)), None)

    def start_compensation(self, step: Leg, now: dt.datetime) -> None:
        self.steps[step].compensation_attempts += 1
        self.current_step = step

    def compensated(self, step: Leg, now: dt.datetime, *, undone: bool, **ids: str) -> None:
        self.steps[step].status = "COMPENSATED" if undone or self.steps[step].status == "SUCCEEDED" else "FAILED"
        self.steps[step].outcome_unknown = False
        self.steps[step].ids.update(ids)

    def compensation_failed(self, step: Leg, error: str, now: dt.datetime) -> None:
        self.steps[step].status = "COMPENSATION_FAILED"
        self.steps[step].outcome_unknown = False
        self.steps[step].error = error

    def finish_compensation(self, now: dt.datetime) -> TripStatus:
        stuck = any(r.status == "COMPENSATION_FAILED" for r in self.steps.values())
        self.status = TripStatus.COMPENSATION_FAILED if stuck else TripStatus.FAILED
        return self.status


class TripStore(InMemorySagaLeases):
    """The saga store port in memory, with the lease and version fences of the real repositories."""

    def __init__(self) -> None:
        super().__init__()
        self.trips: dict[str, Trip] = {}
        self.writes = 0

    def add(self, trip: Trip, lease: Lease) -> None:
        self.trips[trip.id] = copy.deepcopy(trip)
        self.hold(trip.id, lease)

    async def get(self, saga_id: str) -> Trip | None:
        trip = self.trips.get(saga_id)
        return None if trip is None else copy.deepcopy(trip)

    async def save(self, state: Trip, lease: Lease, *, release: bool = False) -> None:
        self.fence(state.id, lease, self.trips[state.id].version == state.version, release=release)
        state.version += 1
        self.trips[state.id] = copy.deepcopy(state)
        self.writes += 1

    async def claimable(self, now: dt.datetime, limit: int, after: BacklogKey | None = None) -> list[BacklogKey]:
        return sorted((now, t.id) for t in self.trips.values() if not t.finished and self.free(t.id, now))[:limit]


class TripUnitOfWork(FakeUnitOfWork):
    def __init__(self) -> None:
        super().__init__()
        self.trips = TripStore()


class Refused(Exception):
    """What a scripted call raises: `kind` says how the step judges it."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Gate:
    """A call that does not answer until the test opens the gate; `reached` is set once the call is made."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()


class Booking(SagaStep[Trip]):
    """A leg whose calls answer from a script: an exception to raise, a Gate to wait at, or (once the script is
    used up) success. Every call is written to `calls`."""

    errors = (Refused,)

    def __init__(self, calls: list[str], executes: list | None = None, compensations: list | None = None) -> None:
        self.calls = calls
        self.executes = list(executes or [])
        self.compensations = list(compensations or [])

    async def _answer(self, script: list) -> None:
        if script:
            answer = script.pop(0)
            if isinstance(answer, Gate):
                answer.reached.set()
                await answer.opened.wait()
            elif answer is not None:
                raise answer

    async def execute(self, state: Trip) -> Mapping[str, str]:
        self.calls.append(f"execute {self.label}")
        await self._answer(self.executes)
        return {"booking_id": f"{self.label.lower()}-1"}

    async def compensate(self, state: Trip) -> Undo:
        self.calls.append(f"compensate {self.label}")
        await self._answer(self.compensations)
        return Undo(True)

    def failure(self, err: Exception, state: Trip) -> tuple[Failure, bool]:
        return Failure("NO_SEATS" if isinstance(err, Refused) else "BROKEN", str(err)), False

    def waits(self, err: Refused) -> bool:
        return err.kind == "busy"

    def retryable(self, err: Refused) -> bool:
        return err.kind == "transient"


class BookFlight(Booking):
    name = Leg.FLIGHT


class BookHotel(Booking):
    name = Leg.HOTEL


class BookCar(Booking):
    name = Leg.CAR


class TripSaga(Saga[Trip]):
    aggregate = "trip"
    noun = "trip"
    resume_span = "resume trip saga"
    recovery_name = "trip.saga_recovery"
    log = logging.getLogger("tessera.trip.saga")

    def __init__(self, flight: Booking, hotel: Booking, car: Booking) -> None:
        super().__init__((flight, hotel, car))
        self.ends: list[TripStatus] = []

    def store(self, uow: TripUnitOfWork) -> TripStore:
        return uow.trips

    def ended(self, state: Trip) -> None:
        self.ends.append(state.status)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@dataclasses.dataclass
class Trips:
    uow: TripUnitOfWork
    clock: Clock
    calls: list[str]
    pauses: list[float]

    def saga(self, **scripts: list) -> TripSaga:
        """The trip saga whose legs answer from `scripts` (flight=, hotel=, car=, and their *_undo compensations)."""
        return TripSaga(*(leg(self.calls, scripts.get(name), scripts.get(f"{name}_undo"))
                          for leg, name in ((BookFlight, "flight"), (BookHotel, "hotel"), (BookCar, "car"))))

    def runner(self, saga: TripSaga, owner: str = "runner-1", policy: SagaPolicy = POLICY) -> SagaRunner[Trip]:
        async def pause(seconds: float) -> None:
            self.pauses.append(seconds)

        return SagaRunner(saga, self.uow.factory, policy, owner=owner, clock=self.clock, sleep=pause)

    async def book(self, runner: SagaRunner[Trip], trip_id: str = "trip-1") -> Trip | None:
        """Stores a new trip leased to `runner` and runs its saga to its end."""
        self.uow.trips.add(Trip(trip_id), runner.new_lease())
        return await runner.run(trip_id, leased=True).task

    def stored(self, trip_id: str = "trip-1") -> Trip:
        return self.uow.trips.trips[trip_id]


@pytest.fixture
def trips() -> Trips:
    return Trips(TripUnitOfWork(), Clock(), [], [])


def statuses(trip: Trip) -> dict[str, str]:
    return {leg.value: record.status for leg, record in trip.steps.items()}


async def test_steps_run_forward_in_order_one_write_each_and_the_last_write_frees_the_lease(trips):
    saga = trips.saga()
    done = await trips.book(trips.runner(saga))
    assert trips.calls == ["execute FLIGHT", "execute HOTEL", "execute CAR"]
    assert done.status is TripStatus.BOOKED and trips.stored().status is TripStatus.BOOKED
    assert trips.stored().steps[Leg.HOTEL].ids == {"booking_id": "hotel-1"}
    # The first step's start, each completion with the next step's start, and the end that frees the lease.
    assert trips.uow.trips.writes == 4
    assert trips.uow.trips.sagas["trip-1"].lease_owner is None and saga.ends == [TripStatus.BOOKED]


async def test_a_final_failure_compensates_the_executed_steps_in_reverse_and_only_those(trips):
    saga = trips.saga(car=[Refused("no cars")])
    done = await trips.book(trips.runner(saga))
    assert trips.calls == ["execute FLIGHT", "execute HOTEL", "execute CAR", "compensate HOTEL",
                           "compensate FLIGHT"]
    assert statuses(done) == {"FLIGHT": "COMPENSATED", "HOTEL": "COMPENSATED", "CAR": "FAILED"}
    assert done.status is TripStatus.FAILED and done.failure == Failure("NO_SEATS", "no cars")
    assert trips.stored().status is TripStatus.FAILED and saga.ends == [TripStatus.FAILED]


async def test_a_step_that_fails_with_an_answer_compensates_what_ran_before(trips):
    saga = trips.saga(hotel=[StepFailed(Failure("FULL", "the hotel is full"), booking_id="hotel-9")])
    done = await trips.book(trips.runner(saga))
    assert trips.calls == ["execute FLIGHT", "execute HOTEL", "compensate FLIGHT"]
    assert statuses(done) == {"FLIGHT": "COMPENSATED", "HOTEL": "FAILED", "CAR": "PENDING"}
    assert done.steps[Leg.HOTEL].ids == {"booking_id": "hotel-9"} and done.failure.reason == "FULL"


async def test_a_retryable_error_is_retried_with_growing_backoff_up_to_the_attempts_then_fails(trips):
    saga = trips.saga(hotel=[Refused("transient")] * 5)
    done = await trips.book(trips.runner(saga))
    assert trips.calls == ["execute FLIGHT"] + ["execute HOTEL"] * POLICY.step_max_attempts + ["compensate FLIGHT"]
    assert done.steps[Leg.HOTEL].attempts == POLICY.step_max_attempts
    assert done.status is TripStatus.FAILED and done.steps[Leg.HOTEL].status == "FAILED"
    # A pause after each failed attempt but the last, with equal jitter around a doubling base.
    first, second = trips.pauses
    assert 0.005 <= first <= 0.01 and 0.01 <= second <= 0.02
    assert done.steps[Leg.HOTEL].error == repr(Refused("transient"))


async def test_a_wait_for_a_call_still_in_progress_does_not_use_up_attempts(trips):
    waits = POLICY.step_max_attempts + 2
    policy = dataclasses.replace(POLICY, compensation_max_attempts=waits + 1)
    saga = trips.saga(hotel=[Refused("busy")] * waits)
    done = await trips.book(trips.runner(saga, policy=policy))
    assert done.status is TripStatus.BOOKED
    assert trips.calls.count("execute HOTEL") == waits + 1 and len(trips.pauses) == waits
    assert done.steps[Leg.HOTEL].attempts == 1  # the attempt counted before the first call, no other


async def test_a_compensation_that_keeps_failing_ends_compensation_failed_for_an_operator(trips, caplog):
    caplog.set_level(logging.ERROR, logger="tessera.trip.saga")
    before = metrics.SAGA_COMPENSATION_FAILURES.labels("FLIGHT")._value.get()
    saga = trips.saga(hotel=[Refused("no rooms")], flight_undo=[Refused("transient")] * 10)
    runner = trips.runner(saga)
    done = await trips.book(runner)
    assert trips.calls == ["execute FLIGHT", "execute HOTEL"] + ["compensate FLIGHT"] * POLICY.compensation_max_attempts
    assert statuses(done) == {"FLIGHT": "COMPENSATION_FAILED", "HOTEL": "FAILED", "CAR": "PENDING"}
    assert done.steps[Leg.FLIGHT].compensation_attempts == POLICY.compensation_max_attempts
    # It ended there, visibly: its state says so, an error names it, the metric counts it; nothing resumes it.
    assert trips.stored().status is TripStatus.COMPENSATION_FAILED and saga.ends == [TripStatus.COMPENSATION_FAILED]
    assert metrics.SAGA_COMPENSATION_FAILURES.labels("FLIGHT")._value.get() == before + 1
    [record] = [r for r in caplog.records if "needs an operator" in r.getMessage()]
    assert record.getMessage() == "compensation failed after all retries; the trip needs an operator"
    assert record.trip_id == "trip-1" and record.step == "FLIGHT"
    assert await runner.recover_once() == 0 and trips.calls.count("compensate FLIGHT") == 3


async def test_a_saga_interrupted_after_a_step_is_resumed_by_another_runner_from_the_next_step(trips):
    hung = Gate()  # never opened: the first runner's process froze (or died) in the hotel call
    first = trips.runner(trips.saga(hotel=[hung]), owner="runner-1")
    trips.uow.trips.add(Trip("trip-1"), first.new_lease())
    first.run("trip-1", leased=True)
    await hung.reached.wait()
    writes = trips.uow.trips.writes
    second = trips.runner(trips.saga(), owner="runner-2")
    assert await second.recover_once() == 0  # the first runner's lease still holds
    trips.clock.now += dt.timedelta(seconds=POLICY.lease_seconds + 1)
    assert await second.recover_once() == 1
    done = await second.running("trip-1").task
    assert done.status is TripStatus.BOOKED
    # The flight was booked once; the interrupted hotel call is the only one made again.
    assert trips.calls == ["execute FLIGHT", "execute HOTEL", "execute HOTEL", "execute CAR"]
    assert done.steps[Leg.FLIGHT].attempts == 1 and done.steps[Leg.HOTEL].attempts == 2
    assert trips.uow.trips.writes == writes + 3
    await first.stop()


async def test_a_runner_that_lost_its_lease_stops_without_writing(trips, caplog):
    caplog.set_level(logging.WARNING, logger="tessera.trip.saga")
    slow = Gate()
    runner = trips.runner(trips.saga(hotel=[slow]), owner="runner-1")
    trips.uow.trips.add(Trip("trip-1"), runner.new_lease())
    execution = runner.run("trip-1", leased=True)
    await slow.reached.wait()
    trips.clock.now += dt.timedelta(seconds=POLICY.lease_seconds + 1)
    other = Lease("runner-2", trips.clock.now + dt.timedelta(seconds=POLICY.lease_seconds))
    assert await trips.uow.trips.acquire_lease("trip-1", other, trips.clock.now)
    before = copy.deepcopy(trips.stored())
    writes = trips.uow.trips.writes
    slow.opened.set()  # the hotel answers, too late
    assert await execution.task is None and execution.outcome() is None
    assert trips.uow.trips.writes == writes and trips.stored() == before
    assert trips.calls == ["execute FLIGHT", "execute HOTEL"]  # nothing after the lost write
    assert trips.uow.trips.sagas["trip-1"].lease_owner == "runner-2"  # and the new holder's lease is left alone
    assert any(r.getMessage() == "saga taken over by another runner" for r in caplog.records)


def passed_over() -> float:
    return metrics.BATCH_JOB_ITEMS_PASSED_OVER.labels("trip.saga_recovery")._value.get()


async def test_a_resumed_saga_whose_run_fails_unexpectedly_is_passed_over_visibly_and_stays_resumable(trips, caplog):
    caplog.set_level(logging.INFO, logger="tessera.trip")
    runner = trips.runner(trips.saga(flight=[KeyError("booking_id"), ConnectionRefusedError("database away")]))
    trips.uow.trips.add(Trip("trip-1"), Lease("gone", trips.clock.now - dt.timedelta(seconds=1)))
    before = passed_over()

    # Its own fault (a KeyError in the step's code): counted and logged by the recovery with the saga's id.
    assert await runner.recover_once() == 1
    assert await runner.running("trip-1").task is None
    assert passed_over() == before + 1
    [record] = [r for r in caplog.records if r.name == "tessera.trip.saga_recovery" and r.levelname == "ERROR"]
    assert record.getMessage() == ("trip.saga_recovery passed over trip-1 until its next round: the saga was "
                                   "interrupted by an unexpected error")
    assert (record.item_id, record.trip_id, record.exc_info[0]) == ("trip-1", "trip-1", KeyError)
    assert trips.uow.trips.sagas["trip-1"].lease_owner is None  # free for the next round

    # The database being away is not the saga's fault: interrupted, resumed later, not counted as passed over.
    assert await runner.recover_once() == 1
    assert await runner.running("trip-1").task is None
    assert passed_over() == before + 1
    assert any(r.getMessage() == "saga interrupted by an unexpected error" and r.trip_id == "trip-1"
               for r in caplog.records)

    # Once the cause is gone the next round resumes it to its end.
    assert await runner.recover_once() == 1
    assert (await runner.running("trip-1").task).status is TripStatus.BOOKED
    assert trips.stored().status is TripStatus.BOOKED
