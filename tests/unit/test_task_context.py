"""The worker's settings cache (task_context.worker_settings), without a cluster."""

from __future__ import annotations

import pytest
from prefect.context import SettingsContext
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from grid_flows.adapters.prefect import task_context

pytestmark = pytest.mark.timeout(60)


def _serialized(retries: int) -> dict:
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: retries}):
        return SettingsContext.get().serialize()


def test_equal_settings_are_built_once_and_each_task_gets_its_own_context():
    first = task_context.worker_settings(_serialized(3))
    second = task_context.worker_settings(_serialized(3))
    assert first is not second  # entered once at a time each
    assert first.settings is second.settings
    assert first.settings == SettingsContext(**_serialized(3)).settings


def test_different_settings_are_built_apart_and_the_cache_stays_bounded():
    built = {n: task_context.worker_settings(_serialized(n)).settings for n in range(10, 16)}
    assert {s.client.max_retries for s in built.values()} == set(range(10, 16))
    assert len(task_context._worker_cache) == task_context._WORKER_CACHE_SIZE
    # The most recent ones are still cached; the oldest was rebuilt.
    assert task_context.worker_settings(_serialized(15)).settings is built[15]
    assert task_context.worker_settings(_serialized(10)).settings is not built[10]


def test_the_context_can_be_entered_and_restores_the_previous_one():
    before = SettingsContext.get()
    with task_context.worker_settings(_serialized(21)):
        assert PREFECT_CLIENT_MAX_RETRIES.value() == 21
    assert SettingsContext.get() is before


def test_the_worker_context_keeps_one_open_client_per_settings_and_leaks_no_context():
    from prefect.client.orchestration import get_client
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED

    def serialized(url: str) -> dict:  # no server here: skip the version check opening a client makes
        with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED: False}):
            return SettingsContext.get().serialize()

    first, other = serialized("http://127.0.0.1:9/api"), serialized("http://127.0.0.1:10/api")
    clients = []
    for ser in (first, first, other):
        with task_context.worker_context(ser):
            # What Prefect's task engine asks for: both reuse the worker's open client.
            with SyncClientContext.get_or_create() as ctx:
                assert get_client(sync_client=True) is ctx.client
                clients.append(ctx.client)
        assert SyncClientContext.get() is None
    assert clients[0] is clients[1]
    assert clients[2] is not clients[0]
    assert str(clients[0].api_url) == "http://127.0.0.1:9/api/"
    assert str(clients[2].api_url) == "http://127.0.0.1:10/api/"
