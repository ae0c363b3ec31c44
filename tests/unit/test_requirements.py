"""requirements.py: requires() blocks, grid: task tags, prefect-ray's remote_options, and bad input."""

from __future__ import annotations

import pytest

from grid_flows.core.models import Priority, Resources
from grid_flows.errors import InvalidRequest
from grid_flows.runner.requirements import DEFAULT_NEED, Need, current_need, from_tags, requires, with_default

GIB = 1024**3
MIB = 1024**2


# --------------------------------------------------------------------------- defaults


def test_nothing_stated_is_one_cpu_at_normal_priority():
    need = current_need()
    assert need == Need()
    assert need.resources() == DEFAULT_NEED == Resources(cpu=1)
    assert with_default(need).priority is Priority.normal
    assert need.vram is None  # unstated: the node's mode default applies on the worker


# --------------------------------------------------------------------------- requires()


def test_requires_states_every_field_and_yields_the_need():
    with requires(cpu="2", gpu=1, memory="512MiB", vram="8GiB", node="gpu1", priority="high") as need:
        assert need == Need(cpu=2.0, gpu=1.0, memory=512 * MIB, node="gpu1", priority=Priority.high, vram=8 * GIB)
        assert current_need() == need
        assert need.resources() == Resources(cpu=2, gpu=1, memory=512 * MIB)  # VRAM is not a Ray resource
    assert current_need() == Need()


def test_nested_blocks_innermost_wins_field_by_field():
    with requires(cpu=2, memory="1GiB"):
        with requires(gpu=1, vram="4GiB"):
            with requires(cpu=4, vram="6GiB"):
                assert current_need() == Need(cpu=4, gpu=1, memory=GIB, vram=6 * GIB)
            assert current_need() == Need(cpu=2, gpu=1, memory=GIB, vram=4 * GIB)
        assert current_need() == Need(cpu=2, memory=GIB)
    assert current_need() == Need()


def test_a_block_is_left_cleanly_when_its_body_raises():
    with pytest.raises(RuntimeError):
        with requires(gpu=1):
            raise RuntimeError("task code failed")
    assert current_need() == Need()


def test_memory_and_vram_as_bytes_or_sizes():
    with requires(gpu=1, memory=2048, vram=3 * GIB) as need:
        assert (need.memory, need.vram) == (2048, 3 * GIB)
    with requires(gpu=1, memory="2GB", vram="1.5GiB") as need:
        assert (need.memory, need.vram) == (2 * 1000**3, int(1.5 * GIB))


# --------------------------------------------------------------------------- tags


def test_tags_state_every_field_and_other_tags_are_ignored():
    need = from_tags(["etl", "grid:cpu=2", "grid:gpu=0.5", "grid:memory=4GiB", "grid:vram=2GiB",
                      "grid:node=gpu1", "grid:priority=critical", "nightly"])
    assert need == Need(cpu=2, gpu=0.5, memory=4 * GIB, node="gpu1", priority=Priority.critical, vram=2 * GIB)
    assert from_tags([]) == Need() == from_tags(["plain", "other:cpu=3"])


def test_the_last_tag_of_a_key_wins():
    assert from_tags(["grid:cpu=1", "grid:cpu=3"]).cpu == 3


def test_requires_wins_over_tags_and_tags_fill_the_gaps():
    tags = ["grid:cpu=8", "grid:gpu=1", "grid:vram=2GiB"]
    assert current_need(tags) == Need(cpu=8, gpu=1, vram=2 * GIB)
    with requires(cpu=1, vram="6GiB"):
        assert current_need(tags) == Need(cpu=1, gpu=1, vram=6 * GIB)
    with requires(gpu=1):  # a block that needs a GPU gives a vram tag its GPU
        assert current_need(["grid:vram=1GiB"]) == Need(gpu=1, vram=GIB)


@pytest.mark.parametrize(
    "tag",
    ["grid:cpu", "grid:disk=1GiB", "grid:=2", "grid:VRAM=1GiB"],
)
def test_unknown_or_malformed_grid_tags_are_refused(tag):
    with pytest.raises(InvalidRequest, match=rf"task tag '{tag}': expected grid:cpu=N, .*grid:vram=SIZE"):
        from_tags([tag])


@pytest.mark.parametrize(
    "tags, message",
    [
        (["grid:cpu=two"], r"task tags \['cpu'\]: cpu must be a number, got 'two'"),
        (["grid:memory=8"], r"task tags \['memory'\]: memory '8' has no unit: write e.g. '8GiB'"),
        (["grid:vram=8"], r"task tags \['vram'\]: vram '8' has no unit: write e.g. '8GiB'"),
        (["grid:vram=lots", "grid:gpu=1"], r"task tags \['gpu', 'vram'\]: vram must be bytes or a size"),
        (["grid:priority=urgent"], r"task tags \['priority'\]: 'urgent' is not a valid Priority"),
        (["grid:gpu=-1"], r"gpu must not be negative"),
    ],
)
def test_bad_tag_values_are_refused_in_one_line(tags, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        from_tags(tags)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- remote_options fallback


def test_remote_options_fill_what_neither_requires_nor_tags_state():
    options = {"num_cpus": 3, "num_gpus": 1, "memory": 2 * GIB, "max_calls": 1, "runtime_env": {}}
    assert current_need((), options) == Need(cpu=3, gpu=1, memory=2 * GIB)
    assert current_need(["grid:cpu=2"], options) == Need(cpu=2, gpu=1, memory=2 * GIB)
    with requires(memory="1GiB"):
        assert current_need(["grid:cpu=2"], options) == Need(cpu=2, gpu=1, memory=GIB)
    assert current_need((), {"max_calls": 1}) == Need()  # nothing about needs: still 1 CPU
    assert current_need((), {}).resources() == DEFAULT_NEED


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_cpus": -1}, "remote_options\\(\\): cpu must not be negative"),
        ({"num_gpus": "one"}, "remote_options\\(\\): gpu must be a number, got 'one'"),
        ({"memory": float("nan")}, "remote_options\\(\\): memory must be a number, got NaN"),
    ],
)
def test_bad_remote_options_are_refused(options, message):
    with pytest.raises(InvalidRequest, match=message):
        current_need((), options)


def test_a_vram_tag_with_remote_options_gpus_is_a_gpu_task():
    assert current_need(["grid:vram=1GiB"], {"num_gpus": 1}) == Need(gpu=1, vram=GIB)


# --------------------------------------------------------------------------- bad requires() input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cpu": -1}, "cpu must not be negative"),
        ({"cpu": "lots"}, "cpu must be a number, got 'lots'"),
        ({"gpu": float("inf")}, "gpu must be finite"),
        ({"gpu": True}, "gpu must be a number, got True"),
        ({"memory": "8"}, "memory '8' has no unit: write e.g. '8GiB' or '8MiB'"),
        ({"memory": "8 parsecs"}, "memory must be bytes or a size like '4GiB'"),
        ({"gpu": 1, "vram": "8"}, "vram '8' has no unit: write e.g. '8GiB' or '8MiB'"),
        ({"gpu": 1, "vram": -1}, "vram must not be negative"),
        ({"gpu": 1, "vram": "a lot"}, "vram must be bytes or a size like '4GiB'"),
        ({"priority": "asap"}, "'asap' is not a valid Priority"),
    ],
)
def test_bad_requires_input_is_refused_at_once(kwargs, message):
    with pytest.raises(InvalidRequest, match=rf"^requires\(\): {message}"):
        with requires(**kwargs):
            pytest.fail("the block must not be entered")
    assert current_need() == Need()


# --------------------------------------------------------------------------- VRAM belongs to GPU tasks


def test_vram_with_gpu_zero_in_one_block_is_refused_at_once():
    with pytest.raises(InvalidRequest, match=r"^requires\(\): vram=8 GiB with gpu=0: VRAM is the need of a GPU task$"):
        with requires(gpu=0, vram="8GiB"):
            pass
    with pytest.raises(InvalidRequest, match=r"^task tags \['gpu', 'vram'\]: vram=1 GiB with gpu=0"):
        from_tags(["grid:gpu=0", "grid:vram=1GiB"])


def test_vram_on_a_task_that_needs_no_gpu_is_refused_when_submitted():
    message = r"^vram=8 GiB is stated for a task that needs no GPU: add gpu=N \(requires\(gpu=1, vram=...\)"
    with requires(vram="8GiB"):  # an outer block may leave the GPU to an inner one or a tag ...
        with pytest.raises(InvalidRequest, match=message):
            current_need()  # ... but the task submitted here needs none
        assert current_need(["grid:gpu=1"]) == Need(gpu=1, vram=8 * GIB)
        with requires(gpu=1):
            assert current_need() == Need(gpu=1, vram=8 * GIB)
    with pytest.raises(InvalidRequest, match=r"^vram=2 GiB is stated for a task that needs no GPU"):
        current_need(["grid:vram=2GiB", "grid:cpu=1"])


def test_a_cpu_task_inside_a_gpu_block_clears_the_vram_with_zero():
    with requires(gpu=1, vram="8GiB"):
        with requires(gpu=0):
            with pytest.raises(InvalidRequest, match="or vram=0 inside a block that needs none"):
                current_need()
        with requires(gpu=0, vram=0):
            assert current_need() == Need(gpu=0, vram=0)


def test_vram_zero_means_no_check_and_needs_no_gpu():
    with requires(vram=0):
        assert current_need() == Need(vram=0)
    with requires(gpu=1, vram="0GiB"):
        assert current_need().vram == 0
