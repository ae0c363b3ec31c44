"""The Prefect context a task carries into its Ray worker, serialized and restored cheaply.

Prefect handles the settings part of a task's context expensively at both ends (profiles
in BENCHMARKS.md, "Runner overhead"):

- in the driver, ``prefect.context.serialize_context`` dumps the whole settings model for
  every task (~20-50 ms of CPU; 80% of the driver's main thread in a 300-task flow);
- in the Ray worker, ``hydrated_context`` rebuilds it with ``SettingsContext(**dict)``,
  which re-runs pydantic-settings' environment, dotenv and TOML sources for each of ~50
  nested models (~30-90 ms per task, most of a trivial task's CPU);
- in the worker, Prefect also builds two API clients per task, each loading the CA bundle
  (~15 ms).

The settings are the same for every task of a flow, so the driver serializes each
``SettingsContext`` once (``serialize_task_context``) and each worker process rebuilds
each distinct settings dict once and keeps one open client for it (``worker_context``);
everything else is serialized and restored per task, exactly as Prefect does. (So a
worker no longer re-reads its own environment, .env or profiles.toml for every task: the
driver's settings, which the task carries, win either way.)

Example:
    ```python
    # driver
    context = serialize_task_context({"task": task, "task_run_id": run_id,
                                      "task_inputs": inputs, "copy_to_child_ctx": True})
    # worker: the same settings and an open client, then Prefect's own hydration
    with worker_context(context["settings_context"]):
        run_task_sync(task, run_id, context={**context, "settings_context": {}}, ...)
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from prefect.context import (
    AssetContext,
    EngineContext,
    SettingsContext,
    SyncClientContext,
    TagsContext,
    TaskRunContext,
    _deployment_id,
    _deployment_parameters,
)

__all__ = ["serialize_task_context", "settings_for_workers", "worker_context", "worker_settings"]

_lock = threading.Lock()
# (SettingsContext, its settings, their serialization). The objects are held, so their ids are
# never reused. Prefect replaces settings (temporary_settings enters a new context), never edits them.
_cached: Optional[tuple[SettingsContext, Any, dict[str, Any]]] = None


def _settings_part(settings_context: Optional[SettingsContext]) -> dict[str, Any]:
    global _cached
    if settings_context is None:
        return {}
    cached = _cached
    if cached is not None and cached[0] is settings_context and cached[1] is settings_context.settings:
        return cached[2]
    serialized = settings_context.serialize()
    with _lock:
        _cached = (settings_context, settings_context.settings, serialized)
    return serialized


def settings_for_workers() -> dict[str, Any]:
    """The current settings as ``serialize_task_context`` sends them with each task (the same
    dict object while the settings are the same): what a warm-up prepares a worker for."""
    return _settings_part(SettingsContext.get())


def serialize_task_context(asset_ctx_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What ``prefect.context.serialize_context(asset_ctx_kwargs)`` returns (a test checks
    they are equal), with the settings serialized once per ``SettingsContext``. The result
    shares its settings dict with other tasks': read it, do not change it."""
    flow_run_context = EngineContext.get()
    task_run_context = TaskRunContext.get()
    tags_context = TagsContext.get()
    deployment_id = _deployment_id.get()
    return {
        "flow_run_context": flow_run_context.serialize() if flow_run_context else {},
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "settings_context": _settings_part(SettingsContext.get()),
        "asset_context": AssetContext.from_task_and_inputs(**asset_ctx_kwargs).serialize()
        if asset_ctx_kwargs
        else {},
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": _deployment_parameters.get(),
    }


_WORKER_CACHE_SIZE = 4  # distinct settings (flows with other API URLs, profiles) per worker process


@dataclass
class _WorkerEntry:
    serialized: dict[str, Any]
    settings: SettingsContext
    client: Optional[SyncClientContext] = None  # opened on first use, under these settings


_worker_cache: list[_WorkerEntry] = []  # most recent first
# An evicted entry's client is not closed: a task in another thread may still hold it, and
# garbage collection closes its connections once nothing does.


def _worker_entry(serialized: dict[str, Any]) -> _WorkerEntry:
    with _lock:
        for i, entry in enumerate(_worker_cache):
            if entry.serialized is serialized or entry.serialized == serialized:
                if i:
                    _worker_cache.insert(0, _worker_cache.pop(i))
                return entry
        entry = _WorkerEntry(serialized, SettingsContext(**serialized))
        _worker_cache.insert(0, entry)
        del _worker_cache[_WORKER_CACHE_SIZE:]
        return entry


def _fresh_settings_context(entry: _WorkerEntry) -> SettingsContext:
    # A context object can be entered once at a time: each task gets its own around the shared models.
    return SettingsContext(profile=entry.settings.profile, settings=entry.settings.settings)


def worker_settings(serialized: dict[str, Any]) -> SettingsContext:
    """A fresh ``SettingsContext`` to enter, equal to ``SettingsContext(**serialized)``; the
    settings model is built once per distinct ``serialized`` in this process."""
    return _fresh_settings_context(_worker_entry(serialized))


def _open_client(entry: _WorkerEntry) -> SyncClientContext:
    with _lock:  # one client per entry, even if tasks of one worker run in threads
        if entry.client is None:
            client_context = SyncClientContext()
            # Open it for good (what entering it does: build the HTTP client, and Prefect's
            # once-per-process server version check); the context variable it sets lives in a
            # throwaway copy, so nothing leaks into the task.
            try:
                contextvars.copy_context().run(client_context.__enter__)
            except BaseException:
                with contextlib.suppress(Exception):
                    client_context.client.__exit__(None, None, None)
                raise
            entry.client = client_context
        return entry.client


@contextlib.contextmanager
def worker_context(serialized: dict[str, Any]) -> Iterator[None]:
    """Run a task under these settings and this process's open API client for them.

    Without it, every task builds a client twice (Prefect's ``hydrated_context`` and its
    ``SyncClientContext``), each loading the CA bundle (~15 ms). With it,
    ``SyncClientContext.get_or_create()`` and ``get_client(sync_client=True)`` inside a sync
    task return the open client (an async task still builds its own async client)."""
    entry = _worker_entry(serialized)
    with _fresh_settings_context(entry):
        token = SyncClientContext.__var__.set(_open_client(entry))
        try:
            yield
        finally:
            SyncClientContext.__var__.reset(token)
