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
