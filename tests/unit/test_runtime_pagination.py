"""Page tokens are opaque, bound to their method and filters, and checked."""

from __future__ import annotations

import pytest

from tessera_runtime import pagination
from tessera_runtime.errors import InvalidArgument


def test_round_trip():
    token = pagination.encode("ListThings", {"a": 1}, ["2026-01-01T00:00:00+00:00", "id-1"])
    assert pagination.decode(token, "ListThings", {"a": 1}, "x") == ["2026-01-01T00:00:00+00:00", "id-1"]
    assert pagination.decode("", "ListThings", {"a": 1}, "x") is None


@pytest.mark.parametrize("method, filters", [("ListOther", {"a": 1}), ("ListThings", {"a": 2})])
def test_foreign_token_is_refused(method, filters):
    token = pagination.encode("ListThings", {"a": 1}, ["k"])
    with pytest.raises(InvalidArgument) as err:
        pagination.decode(token, method, filters, "x")
    assert err.value.violations[0].field == "page_token"


@pytest.mark.parametrize("token", ["garbage", "AAAA", "%%%", pagination.encode("ListThings", {}, ["k"])[:-3]])
def test_malformed_token_is_refused(token):
    with pytest.raises(InvalidArgument):
        pagination.decode(token, "ListThings", {}, "x")


def test_page_size_contract():
    assert pagination.page_size(0, "x") == pagination.DEFAULT_PAGE_SIZE
    assert pagination.page_size(10_000, "x") == pagination.MAX_PAGE_SIZE
    assert pagination.page_size(7, "x") == 7
    with pytest.raises(InvalidArgument):
        pagination.page_size(-1, "x")


class Row:
    def __init__(self, i: int) -> None:
        import datetime as dt

        self.id = f"id-{i}"
        self.create_time = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)


def test_next_page_and_time_key_round_trip():
    rows = [Row(i) for i in range(4)]
    page, token = pagination.next_page(rows, 3, "ListRows", {"f": 1})
    assert [r.id for r in page] == ["id-0", "id-1", "id-2"] and token
    assert pagination.decode_time_key(token, "ListRows", {"f": 1}, "x") == (rows[2].create_time, "id-2")
    last, no_more = pagination.next_page(rows[:2], 3, "ListRows", {"f": 1})
    assert len(last) == 2 and no_more == ""
    assert pagination.decode_time_key("", "ListRows", {"f": 1}, "x") is None


@pytest.mark.parametrize("key", [
    ["not a time", "id"], ["2026-01-01T00:00:00", "id"], ["2026-01-01T00:00:00+00:00"],
    ["0001-01-01T00:00:00+01:00", "id"], ["2026-01-01T00:00:00+00:00", "a\x00b"], ["2026-01-01T00:00:00+00:00", 7],
    ["2026-01-01T00:00:00+00:00", "id", "more"],
])
def test_a_token_whose_key_is_not_a_time_cursor_is_malformed(key):
    """Not a time, a time without its offset or before the year 1 in UTC, no id, an id PostgreSQL cannot compare
    (NUL) or that is no string: a token made by hand is refused as malformed, never sent to the database."""
    token = pagination.encode("ListRows", {}, key)
    with pytest.raises(InvalidArgument) as err:
        pagination.decode_time_key(token, "ListRows", {}, "x")
    assert err.value.violations[0].field == "page_token" and "malformed" in err.value.violations[0].description
