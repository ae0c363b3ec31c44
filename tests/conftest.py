"""Shared fixtures: one real Prefect server and one real three-node Ray cluster per session.

Unit tests use neither; integration tests ask for ``grid`` (both, with the cluster block
applied) and get a clean ledger before each test.
"""

from __future__ import annotations

import os

# Quiet, light Ray and Prefect settings must be in place before ray or prefect is imported.
# (RAY_TMPDIR is set by LocalCluster, to a directory it makes and removes.)
os.environ.update(
    {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_enable_worker_prestart": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_INTEGRATIONS_GRID_GRANT_TIMEOUT_SECONDS": "1",
    }
)
os.environ.pop("RAY_ADDRESS", None)

from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

# The shape the integration tests reason about: a 1-CPU head and two lenders.
TEST_CLUSTER = {
    "nodes": [
        {"name": "gpu-master", "role": "head", "cpu_count": 1, "memory_gb": 2},
        {
            "name": "gpu1",
            "role": "worker",
            "cpu_count": 4,
            "gpu_count": 1,
            "memory_gb": 8,
            "mode": "conservative",
            "allow_offload_commands": True,  # off by default: the grid-offload flow may start commands here
            "resource_sharing": {
                "can_share": True,
                "max_share_cpu": 2,
                "max_share_gpu": 1,
                "max_share_memory_gb": 4,
                "priority": 1,
            },
        },
        {
            "name": "gpu2",
            "role": "worker",
            "cpu_count": 2,
            "memory_gb": 4,
            "allow_offload_commands": True,  # off by default; the head leaves it off and runs no offloaded command
            "resource_sharing": {"can_share": True, "max_share_cpu": 1, "max_share_memory_gb": 2, "priority": 2},
        },
    ],
    # Short clocks so lifecycle tests take seconds; the rules themselves are unit-tested.
    "resource_sharing": {"min_runtime_seconds": 0, "grace_seconds": 3},
}


@dataclass
class Grid:
    spec: object
    address: str
    api_url: str

    def env(self) -> dict[str, str]:
        """Environment for a second process that talks to the same Ray cluster and Prefect server."""
        return {**os.environ, "RAY_ADDRESS": self.address, "PREFECT_API_URL": self.api_url}


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def grid_session(prefect_server):
    from grid_flows.core.cluster_file import parse_cluster
    from grid_flows.adapters.ray.local_cluster import local_cluster
    from grid_flows.adapters.prefect.store import BoostStore

    spec = parse_cluster(TEST_CLUSTER)
    with BoostStore() as store:
        store.save_cluster(spec)
    with local_cluster(spec) as address:
        yield Grid(spec=spec, address=address, api_url=prefect_server)


@contextmanager
def changed_cluster(grid: Grid, change):
    """The cluster block as ``change(data)`` makes it (``data``: the session spec as JSON)
    meanwhile; the session's spec again afterwards."""
    from grid_flows.adapters.prefect.store import BoostStore

    spec = grid.spec
    changed = type(spec).model_validate(change(spec.model_dump(mode="json")))
    with BoostStore() as store:
        store.save_cluster(changed)
    try:
        yield changed
    finally:
        with BoostStore() as store:
            store.save_cluster(spec)


def sharing_settings(grid: Grid, **settings):
    """The cluster block with ``resource_sharing`` changed meanwhile (``mode=...``, ``enabled=...``)."""
    return changed_cluster(grid, lambda data: {**data, "resource_sharing": {**data["resource_sharing"], **settings}})


@pytest.fixture
def grid(grid_session):
    """The session's cluster with no live boost and no grid placement group, before and after."""
    _clean_ledger()
    yield grid_session
    _clean_ledger()


def _clean_ledger() -> None:
    from grid_flows.control.boosts import release_everything

    release_everything("test cleanup")


def server_events(boost_id: str) -> list[str]:
    """The names of the events the server has for boost ``boost_id``, sorted."""
    return sorted(e["event"] for e in boost_events(boost_id))


def boost_events(boost_id: str) -> list[dict]:
    """The events the server has for boost ``boost_id``, as the API returns them."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/events/filter",
            json={
                "filter": EventFilter(resource=EventResourceFilter(id=[f"grid.boost.{boost_id}"])).model_dump(
                    mode="json"
                ),
                "limit": 50,
            },
        )
    return response.json()["events"]


def placements_artifact(flow_run_id: str):
    """The newest ``grid-placements`` table artifact of one flow run (the key is shared by every
    flow run; each run's versions are attached to it), or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from grid_flows.adapters.prefect.store import PLACEMENTS_ARTIFACT_KEY

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PLACEMENTS_ARTIFACT_KEY]),
                                           flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


def wait_for(read, done, timeout: float = 15.0):
    """``read()`` until ``done(value)`` or ``timeout`` (bounded polling of a server-side condition)."""
    import time

    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a server-side condition, bounded by the deadline
        value = read()
    return value


def controller_off(monkeypatch) -> None:
    """Boost operations run in the test's process (on the records and the ledger lock), where
    a test can inject a failure; the session's controller re-reads the records within 15 s."""
    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_CONTROLLER", "false")


def stop_the_controller(monkeypatch) -> None:
    """``controller_off``, and the running controller stopped for good (not restarted): nothing
    ends boosts behind the test's back. The next caller with the controller on starts a new one."""
    import ray

    from grid_flows.control import client

    controller_off(monkeypatch)
    ray.kill(client.controller(), no_restart=True)
