"""Fixtures shared by every test layer."""

from __future__ import annotations

import pytest

from tests.support import postgres


@pytest.fixture(scope="session")
async def pg_url():
    """URL of an empty PostgreSQL database created for this test session and dropped after it."""
    name, url = await postgres.create_database()
    yield url
    await postgres.drop_database(name)


@pytest.fixture
async def pg_database():
    """A fresh, empty PostgreSQL database for one test: (name, url)."""
    name, url = await postgres.create_database()
    yield name, url
    await postgres.drop_database(name)


@pytest.fixture(scope="session")
def tracing():
    """This process's tracer provider exporting to an in-process OTLP receiver (one per session: a process has one
    global tracer provider), so that spans made here arrive beside those of the service processes a test starts
    (which export to the same receiver); every pending span is exported before the session ends."""
    from tests.support.otlp_receiver import in_process_tracing

    harness = in_process_tracing()
    yield harness
    harness.drain()


def pytest_collection_modifyitems(config, items):
    """Marks each test with its layer from its folder: tests/unit, tests/integration, tests/e2e, ..."""
    for item in items:
        parts = item.path.parts
        for layer in ("unit", "integration", "e2e"):
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))
