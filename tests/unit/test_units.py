"""Unit tests of grid_flows.core.units: parsing and formatting of the quantities users type."""

from __future__ import annotations

import doctest
import math

import pytest

import grid_flows.core.units as units_module
from grid_flows.core.units import (
    check_amount,
    format_amount,
    format_bytes,
    format_duration,
    parse_duration,
    parse_memory,
    parse_number,
)

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
NAN, INF = float("nan"), float("inf")


def test_docstring_examples_hold():
    result = doctest.testmod(units_module)
    assert result.attempted > 0 and result.failed == 0


# --- parse_memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("4GiB", 4 * GIB),
        ("512MiB", 512 * MIB),
        ("2GB", 2_000_000_000),
        ("1.5GiB", 3 * GIB // 2),
        (".5GiB", GIB // 2),
        ("4 gib", 4 * GIB),  # case-insensitive, space before the unit
        ("  8Gi  ", 8 * GIB),  # surrounding whitespace, short binary unit
        ("1k", 1000),
        ("1KB", 1000),
        ("1Ki", KIB),
        ("3m", 3_000_000),
        ("3Mi", 3 * MIB),
        ("1T", 1000**4),
        ("1TiB", TIB),
        ("100b", 100),
        ("1e3b", 1000),
        ("2E1MiB", 20 * MIB),
        ("0", 0),
        ("0GiB", 0),
        (1024, 1024),
        (0, 0),
        (2.0, 2),
        (None, 0),
    ],
)
def test_parse_memory_accepts_sizes(value, expected):
    result = parse_memory(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "text",
    ["four", "", "  ", "GiB", "4XB", "4 GiBs", "4GB/s", "1,024", "-1GiB", "nanGiB", "4 Gi B", "0x10"],
)
def test_parse_memory_rejects_bad_strings_naming_the_input(text):
    with pytest.raises(ValueError) as info:
        parse_memory(text, what="max_share_memory")
    message = str(info.value)
    assert message.startswith("max_share_memory must be bytes or a size like")
    assert repr(text) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "value, fragment",
    [
        (-1, "must not be negative, got -1"),
        (-0.5, "must not be negative, got -0.5"),
        (NAN, "must be a number, got NaN"),
        (INF, "must be finite, got inf"),
        (-INF, "must be finite, got -inf"),
        (True, "must be a number, got True"),
        ([4], "must be a number, got [4]"),
    ],
)
def test_parse_memory_rejects_bad_numbers(value, fragment):
    with pytest.raises(ValueError) as info:
        parse_memory(value, what="memory")
    assert str(info.value) == f"memory {fragment}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("-512", "memory must not be negative, got -512"),
        (" -1 ", "memory must not be negative, got -1"),
        ("nan", "memory must be a number, got NaN"),
        ("inf", "memory must be finite, got inf"),
        ("-inf", "memory must be finite, got -inf"),
    ],
)
def test_parse_memory_plain_number_strings_get_the_precise_error(text, message):
    with pytest.raises(ValueError) as info:
        parse_memory(text)
    assert str(info.value) == message


def test_parse_memory_rejects_a_string_number_that_overflows_to_infinity():
    with pytest.raises(ValueError, match="finite"):
        parse_memory("1e400")


def test_parse_memory_huge_size_with_unit_is_a_value_error():
    with pytest.raises(ValueError, match="memory"):
        parse_memory("1e300TiB")


# --- parse_duration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("2 days", 172800.0),
        ("1d", 86400.0),
        ("10 MIN", 600.0),
        ("3 hours", 10800.0),
        ("1 hr", 3600.0),
        ("5sec", 5.0),
        ("45", 45.0),
        (" 45 ", 45.0),
        ("0", 0.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts_durations(value, expected):
    result = parse_duration(value)
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "text", ["30x", "2 weeks", "1h30m", "m", "", "-5m", "nan s", "30 m s", "2y", "1,5h"]
)
def test_parse_duration_rejects_bad_strings_naming_the_input(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text, what="boost duration")
    message = str(info.value)
    assert message.startswith("boost duration must be seconds or a duration like")
    assert repr(text) in message


@pytest.mark.parametrize(
    "value, fragment",
    [
        (-1, "must not be negative, got -1"),
        (-0.25, "must not be negative, got -0.25"),
        (NAN, "must be a number, got NaN"),
        (INF, "must be finite, got inf"),
        (True, "must be a number, got True"),
        (None, "must be a number, got None"),
    ],
)
def test_parse_duration_rejects_bad_numbers(value, fragment):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == f"duration {fragment}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("-1", "duration must not be negative, got -1"),
        ("-0.5", "duration must not be negative, got -0.5"),
        ("nan", "duration must be a number, got NaN"),
        ("inf", "duration must be finite, got inf"),
    ],
)
def test_parse_duration_plain_number_strings_get_the_precise_error(text, message):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


def test_parse_duration_rejects_a_number_that_overflows_to_infinity():
    with pytest.raises(ValueError, match="finite"):
        parse_duration("1e400")


def test_parse_duration_huge_duration_with_unit_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        parse_duration("1e306d")


# --- parse_number and check_amount ----------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("2", 2.0), ("0.5", 0.5), (" 3 ", 3.0), ("1e2", 100.0), ("0", 0.0), (3, 3.0), (0.25, 0.25)],
)
def test_parse_number_accepts_numbers(value, expected):
    result = parse_number(value, "cpu")
    assert result == expected
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "cpu must be a number, got ''"),
        ("abc", "cpu must be a number, got 'abc'"),
        ("2 CPU", "cpu must be a number, got '2 CPU'"),
        ("nan", "cpu must be a number, got NaN"),
        ("inf", "cpu must be finite, got inf"),
        ("1e999", "cpu must be finite, got inf"),
        ("-1", "cpu must not be negative, got -1"),
        (-2, "cpu must not be negative, got -2"),
        (NAN, "cpu must be a number, got NaN"),
        (INF, "cpu must be finite, got inf"),
        (True, "cpu must be a number, got True"),
        (None, "cpu must be a number, got None"),
    ],
)
def test_parse_number_rejects_bad_input_naming_the_field(value, message):
    with pytest.raises(ValueError) as info:
        parse_number(value, "cpu")
    assert str(info.value) == message


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, 10**6])
def test_check_amount_returns_a_float(value):
    result = check_amount(value, "gpu")
    assert result == value and type(result) is float


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "gpu must not be negative, got -1"),
        (NAN, "gpu must be a number, got NaN"),
        (INF, "gpu must be finite, got inf"),
        (-INF, "gpu must be finite, got -inf"),
        (False, "gpu must be a number, got False"),
        ("1", "gpu must be a number, got '1'"),
        (None, "gpu must be a number, got None"),
    ],
)
def test_check_amount_rejects_naming_the_field(value, message):
    with pytest.raises(ValueError) as info:
        check_amount(value, "gpu")
    assert str(info.value) == message


def test_check_amount_zero_only_when_allowed():
    assert check_amount(0, "duration") == 0.0
    with pytest.raises(ValueError, match="^duration must be greater than zero$"):
        check_amount(0, "duration", allow_zero=False)
    assert check_amount(0.001, "duration", allow_zero=False) == 0.001


# --- formatting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (512 * MIB, "512 MiB"),
        (MIB, "1 MiB"),
        (4 * GIB, "4 GiB"),
        (5 * GIB // 2, "2.5 GiB"),
        (TIB, "1 TiB"),
        (2048 * TIB, "2048 TiB"),
        (4.0 * GIB, "4 GiB"),
    ],
)
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@pytest.mark.parametrize("size", [MIB, GIB, TIB])
def test_format_bytes_round_trips_through_parse_memory(size):
    for count in (1, 3, 512):
        text = format_bytes(count * size).replace(" ", "")
        assert parse_memory(text) == count * size


def test_format_bytes_never_shows_1024_of_a_unit():
    assert format_bytes(MIB - 1) in ("1 MiB", "1.0 MiB")


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "0 s"),
        (45, "45 s"),
        (59.4, "59 s"),
        (59.6, "1 min"),
        (60, "1 min"),
        (1740, "29 min"),
        (3599, "59 min"),
        (3600, "1 h"),
        (7500, "2 h 5 min"),
        (86399, "23 h 59 min"),
        (86400, "1 d"),
        (3 * 86400 + 4 * 3600, "3 d 4 h"),
        (3 * 86400 + 4 * 3600 + 59, "3 d 4 h"),
        (-5, "0 s"),
    ],
)
def test_format_duration(seconds, expected):
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("text", ["45s", "29m", "2h", "3d"])
def test_format_duration_round_trips_whole_units(text):
    assert parse_duration(format_duration(parse_duration(text)).replace(" ", "")) == parse_duration(text)


@pytest.mark.parametrize("value, expected", [(2.0, "2"), (0.5, "0.5"), (0, "0"), (1.25, "1.25")])
def test_format_amount(value, expected):
    assert format_amount(value) == expected


def test_no_float_parse_returns_nan_or_inf():
    # A sweep over the accepted spellings: every accepted value is finite.
    for text in ("1b", "1.5k", "2GiB", "7TiB", "1e10b"):
        assert math.isfinite(parse_memory(text))
    for text in ("1", "1.5h", "2d", "1e10s"):
        assert math.isfinite(parse_duration(text))


@pytest.mark.parametrize("text", ["8", " 8 ", "1e3", "0.5"])
def test_a_memory_string_without_a_unit_is_refused_with_a_hint(text):
    # The seed's `memory 8` meant GiB; reading it as 8 bytes granted a useless boost.
    with pytest.raises(ValueError, match=rf"memory '{text.strip()}' has no unit: write e.g. '{text.strip()}GiB'"):
        parse_memory(text)


def test_bytes_stay_accepted_as_an_explicit_number():
    assert parse_memory(8) == 8 and parse_memory(2**30) == 2**30 and parse_memory("8b") == 8
