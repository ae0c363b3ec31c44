"""The Prefect context a task carries into its Ray worker, serialized and restored cheaply.

Prefect handles the settings part of a task's context expensively at both ends (profiles
in BENCHMARKS.md, "Runner overhead"):

- in the driver, ``prefect.context.serialize_context`` dumps the whole settings model for
  every task (~20-50 ms of CPU; 80% of the driver's main thread in a 300-task flow);
- in the Ray worker, ``hydrated_context`` rebuilds it with ``SettingsContext(**dict)``,
  which re-runs pydantic-settings' environment, dotenv and TOML sources for each of ~50
  nested models (~30-90 ms per task, most of a trivial task's CPU).

The settings are the same for every task of a flow, so the driver serializes each
``SettingsContext`` once (``serialize_task_context``) and each worker process rebuilds
each distinct settings dict once (``worker_settings``); everything else is serialized and
restored per task, exactly as Prefect does.

Example:
    ```python
    # driver
    context = serialize_task_context({"task": task, "task_run_id": run_id,
                                      "task_inputs": inputs, "copy_to_child_ctx": True})
    # worker: the same settings without rebuilding them, then Prefect's own hydration
    with worker_settings(context["settings_context"]):
        run_task_sync(task, run_id, context={**context, "settings_context": {}}, ...)
    ```
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from prefect.context import (
    AssetContext,
    EngineContext,
    SettingsContext,
    TagsContext,
    TaskRunContext,
    _deployment_id,
    _deployment_parameters,
)

__all__ = ["serialize_task_context", "worker_settings"]

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
_worker_cache: list[tuple[dict[str, Any], SettingsContext]] = []  # most recent first


def worker_settings(serialized: dict[str, Any]) -> SettingsContext:
    """A fresh ``SettingsContext`` to enter, equal to ``SettingsContext(**serialized)``; the
    settings model is built once per distinct ``serialized`` in this process."""
    with _lock:
        for i, (known, built) in enumerate(_worker_cache):
            if known == serialized:
                if i:
                    _worker_cache.insert(0, _worker_cache.pop(i))
                break
        else:
            built = SettingsContext(**serialized)
            _worker_cache.insert(0, (serialized, built))
            del _worker_cache[_WORKER_CACHE_SIZE:]
    # A context object can be entered once at a time: each task gets its own around the shared models.
    return SettingsContext(profile=built.profile, settings=built.settings)
