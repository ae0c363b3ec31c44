"""Lend tokens: the Ray encoding of a share (adapters.ray.tokens), whole units rounded up."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import grid_flows.adapters.ray.tokens as tokens_module
from grid_flows.adapters.ray.tokens import (
    LEND_CPU, LEND_GPU, LEND_MEMORY, bundle, from_lend_tokens, lend_tokens, node_tokens,
)
from grid_flows.core.cluster_file import load_cluster_file
from grid_flows.core.models import ClusterSpec, Resources

MIB, GIB = 1024**2, 1024**3
CLUSTER_YAML = Path(__file__).resolve().parents[2] / "blocks" / "cluster.yaml"


def test_docstring_examples_hold():
    result = doctest.testmod(tokens_module)
    assert result.attempted > 0 and result.failed == 0


# --- Resources: lend tokens and bundles -----------------------------------------------


@pytest.mark.parametrize(
    "r, expected",
    [
        (Resources(cpu=2, gpu=1, memory=4 * GIB), {LEND_CPU: 2000.0, LEND_GPU: 1000.0, LEND_MEMORY: 4096.0}),
        (Resources(cpu=0.1), {LEND_CPU: 100.0}),  # 0.1*1000 float noise does not round up to 101
        (Resources(cpu=0.3, gpu=0.7), {LEND_CPU: 300.0, LEND_GPU: 700.0}),
        (Resources(cpu=1.1), {LEND_CPU: 1100.0}),
        (Resources(cpu=4.03, gpu=2.007), {LEND_CPU: 4030.0, LEND_GPU: 2007.0}),  # x*1000 is just above a whole
        (Resources(cpu=0.0015), {LEND_CPU: 2.0}),  # fractions of a unit round up
        (Resources(memory=1), {LEND_MEMORY: 1.0}),
        (Resources(memory=MIB), {LEND_MEMORY: 1.0}),
        (Resources(memory=MIB + 1), {LEND_MEMORY: 2.0}),
        (Resources(), {}),  # zero amounts are left out
    ],
)
def test_lend_tokens_are_whole_units_rounded_up(r, expected):
    tokens = lend_tokens(r)
    assert tokens == expected
    assert all(float(v).is_integer() and v > 0 for v in tokens.values())
    # never fewer tokens than the resources they stand for
    assert r.fits_in(from_lend_tokens(tokens))


@pytest.mark.parametrize(
    "r",
    [
        Resources(cpu=2, gpu=1, memory=4 * GIB),
        Resources(cpu=2.5, gpu=0.25, memory=1536 * MIB),
        Resources(cpu=0.001),
        Resources(gpu=0.125),
        Resources(memory=7 * MIB),
        Resources(),
    ],
)
def test_from_lend_tokens_round_trips_whole_units(r):
    assert from_lend_tokens(lend_tokens(r)) == r


def test_bundle_holds_raw_resources_and_lend_tokens():
    made = bundle(Resources(cpu=2, gpu=1, memory=4 * GIB))
    assert made == {
        "CPU": 2.0,
        "GPU": 1.0,
        "memory": float(4 * GIB),
        LEND_CPU: 2000.0,
        LEND_GPU: 1000.0,
        LEND_MEMORY: 4096.0,
    }


def test_bundle_leaves_out_zero_amounts():
    made = bundle(Resources(cpu=2))
    assert made == {"CPU": 2.0, LEND_CPU: 2000.0}
    assert bundle(Resources()) == {}


def test_a_lender_declares_its_share_as_tokens():
    spec = load_cluster_file(CLUSTER_YAML)
    assert node_tokens(spec.node("gpu1")) == {LEND_CPU: 2000.0, LEND_GPU: 1000.0, LEND_MEMORY: 4096.0}


def test_a_node_that_does_not_share_declares_no_token():
    spec = ClusterSpec.model_validate(
        {"nodes": [{"name": "h", "role": "head"},
                   {"name": "w", "cpu_count": 4, "resource_sharing": {"can_share": False, "max_share_cpu": 2}}]}
    )
    assert node_tokens(spec.node("w")) == {}
