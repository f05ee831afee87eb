"""Headers read from messages other publishers may have sent: a value that is not the expected kind is read as
absent, never as an error (an error there would fail the message on every delivery)."""

from __future__ import annotations

import decimal

import pytest

from tessera_runtime.messaging import envelope


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), decimal.Decimal("Infinity"), "two",
                                   b"\x00", None, [1]])
def test_an_attempt_header_that_is_no_whole_number_reads_as_the_default(value):
    assert envelope.header_int({envelope.ATTEMPT: value}, envelope.ATTEMPT, 1) == 1


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("4", 4), (2.0, 2), (decimal.Decimal("5"), 5)])
def test_an_attempt_header_that_is_a_whole_number_reads_as_it(value, expected):
    assert envelope.header_int({envelope.ATTEMPT: value}, envelope.ATTEMPT, 1) == expected


def test_no_headers_read_as_the_default():
    assert envelope.header_int(None, envelope.ATTEMPT, 7) == 7
