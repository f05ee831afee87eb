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


def pytest_collection_modifyitems(config, items):
    """Marks each test with its layer from its folder: tests/unit, tests/integration, tests/e2e, ..."""
    for item in items:
        parts = item.path.parts
        for layer in ("unit", "integration", "e2e"):
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))
