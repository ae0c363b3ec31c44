"""ray_cluster.task_options: the one builder of Ray options for a placement (no cluster needed)."""

from __future__ import annotations

import pytest

from grid_flows.adapters.ray.tokens import LEND_CPU
from grid_flows.core.models import Resources
from grid_flows.adapters.ray.cluster import NODE_LABEL
from grid_flows.adapters.ray.cluster import task_options
from grid_flows.core.placement import PlacementKind

NEED = Resources(cpu=1, memory=512 * 1024**2)


def test_target_tasks_keep_rays_retries_and_go_by_label():
    options = task_options(PlacementKind.target, NEED, "gpu-master")
    assert options == {"num_cpus": 1, "num_gpus": 0, "memory": NEED.memory, "label_selector": {NODE_LABEL: "gpu-master"}}


def test_offloaded_tasks_carry_lend_tokens_and_are_not_retried_by_ray():
    options = task_options(PlacementKind.offload, NEED, "gpu1")
    assert options["label_selector"] == {NODE_LABEL: "gpu1"}
    assert options["resources"][LEND_CPU] == 1000
    assert options["max_retries"] == 0  # a retry would wait forever for a dead lender's label


def test_boosted_tasks_go_into_the_group_and_are_not_retried_by_ray():
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from grid_flows.adapters.ray.cluster import group_handle

    group = group_handle("ab" * 18)
    options = task_options(PlacementKind.boost, NEED, "gpu1", group=group)
    strategy = options["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy) and isinstance(strategy.placement_group, PlacementGroup)
    assert strategy.placement_group_bundle_index == 0 and options["max_retries"] == 0
    assert "label_selector" not in options


@pytest.mark.parametrize("kind", [PlacementKind.target, PlacementKind.offload])
def test_unlabelled_clusters_get_no_selector(kind):
    assert "label_selector" not in task_options(kind, NEED, "gpu1", labelled=False)


def test_a_users_runtime_env_keeps_the_runners_api_url():
    from grid_flows.runner.task_runner import _with_worker_env

    ours = {"runtime_env": {"env_vars": {"PREFECT_API_URL": "http://head:4200/api"}}}
    theirs = {"num_cpus": 1, "runtime_env": {"pip": ["x"], "env_vars": {"MY": "1"}}}
    merged = _with_worker_env(theirs, ours)
    assert merged["runtime_env"] == {"pip": ["x"], "env_vars": {"PREFECT_API_URL": "http://head:4200/api", "MY": "1"}}
    assert merged["num_cpus"] == 1
    assert _with_worker_env({"num_cpus": 1}, ours)["runtime_env"] == ours["runtime_env"]
    assert _with_worker_env(theirs, {}) is theirs
