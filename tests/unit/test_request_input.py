"""Input the request path refuses before it touches Ray or Prefect: one-line InvalidRequest."""

from __future__ import annotations

import math

import pytest

from grid_flows.control.boosts import _check_pending_timeout, parse_request_resources
from grid_flows.core.ledger import new_boost
from grid_flows.core.models import DEFAULT_CLUSTER, Priority, Resources, utcnow
from grid_flows.errors import InvalidRequest, UnknownBoost
from grid_flows.adapters.prefect.store import BoostStore

REFUSED = [
    (dict(cpu=10**400), "cpu must be finite"),
    (dict(gpu=10**400), "gpu must be finite"),
    (dict(memory=10**400), "memory must be finite"),
    (dict(cpu=1e-9), "cpu: 1e-09 is below the smallest amount a boost can hold (0.001)"),
    (dict(gpu=0.0005), "gpu: 0.0005 is below the smallest amount"),
    (dict(memory=8), "memory: 8 bytes is below the smallest amount a boost can hold (1 MiB)"),
    (dict(memory="512KiB"), "below the smallest amount"),
    (dict(cpu=True), "must be a number"),
]


@pytest.mark.parametrize("kwargs, message", REFUSED, ids=[str(k) for k, _ in REFUSED])
def test_amounts_a_boost_cannot_hold_are_refused_in_one_line(kwargs, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_request_resources(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(cpu=0.001), dict(gpu=0.25), dict(memory="1MiB"), dict(memory=2**30)])
def test_the_smallest_amounts_are_accepted(kwargs):
    assert not parse_request_resources(**kwargs).is_zero()


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, True, "10"])
def test_a_pending_timeout_must_be_a_finite_number_of_seconds(value):
    with pytest.raises(InvalidRequest, match="pending timeout must be a finite number of seconds >= 0"):
        _check_pending_timeout(value)


def test_zero_pending_timeout_is_allowed():
    _check_pending_timeout(0)


def _records() -> list:
    return [
        new_boost(boost_id, source="gpu1", target="gpu-master", resources=Resources(cpu=1),
                  priority=Priority.normal, duration_seconds=60, now=utcnow(),
                  cluster=DEFAULT_CLUSTER)
        for boost_id in ("abcd1234" + "0" * 24, "abce5678" + "0" * 24)
    ]


@pytest.mark.parametrize("value", [None, 123, 4.5, ["abcd"]])
def test_a_boost_id_that_is_not_a_string_is_invalid_request(value):
    with pytest.raises(InvalidRequest, match="boost id must be a string"):
        BoostStore().resolve(value, _records())  # resolve() over given records needs no server


@pytest.mark.parametrize("prefix", ["a", "ab", "abc"])
def test_a_prefix_shorter_than_four_characters_is_refused(prefix):
    with pytest.raises(InvalidRequest, match="too short: give at least 4 characters"):
        BoostStore().resolve(prefix, _records())


def test_a_four_character_prefix_names_one_boost_and_non_hex_is_unknown():
    records = _records()
    assert BoostStore().resolve("abcd", records).id == records[0].id
    twin = records[0].model_copy(update={"id": "abcd9999" + "0" * 24})
    with pytest.raises(UnknownBoost, match="ambiguous"):
        BoostStore().resolve("abcd", [*records, twin])
    with pytest.raises(UnknownBoost, match="boost ids are hexadecimal"):
        BoostStore().resolve("gpu1-boost", records)
