"""Boost records over plain HTTP, for ``grid boost status``: the same read, without ``import prefect``.

Why hand-written: importing Prefect's client costs 1-1.5 s of CPU, most of a status call's
2 s budget on a small machine. This read needs only httpx, and is tried only when
``PREFECT_API_URL`` is in the environment (where it wins over every other settings source).
Anything it does not handle (no such variable, TLS or header settings, a cluster name set in a
settings file, a refusal, an error) returns None, and the caller reads through Prefect's client as before: it is a shortcut,
never a second behaviour.

Example:
    ```python
    from grid_flows.adapters.prefect.quick_read import read_boosts

    boosts = read_boosts(include_ended=False)   # None: use BoostStore().list() instead
    ```
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Optional

from grid_flows.adapters.prefect.records import (
    BOOST_HISTORY_SLUG, BOOST_SLUG, PAGE, boost_from_data, documents_page, in_cluster,
)
from grid_flows.core.models import DEFAULT_CLUSTER, Boost

TIMEOUT_SECONDS = 5.0
# Settings that change how Prefect's client talks to the API: with any of them set, the full client reads.
CLIENT_SETTINGS = ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "PREFECT_API_SSL_CERT_FILE", "PREFECT_CLIENT_CUSTOM_HEADERS",
                   "PREFECT_API_ENABLE_HTTP2", "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED")


def api_from_environment(env: Optional[dict] = None) -> Optional[tuple[str, dict[str, str]]]:
    """The API URL and auth headers the environment gives, or None when the full client must read."""
    env = os.environ if env is None else env
    url = (env.get("PREFECT_API_URL") or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or any(env.get(name) for name in CLIENT_SETTINGS):
        return None
    headers = {"Accept": "application/json"}
    if env.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {env['PREFECT_API_KEY']}"
    elif env.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    return url, headers


CLUSTER_VARIABLE = "PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK"


def cluster_from_environment(env: Optional[dict] = None, cwd: Optional[Path] = None) -> Optional[str]:
    """The cluster (GridCluster block) name GridSettings would give, or None when a settings
    file (prefect.toml, pyproject.toml, .env, the Prefect profiles) may set it: only the full
    settings machinery reads those."""
    env = os.environ if env is None else env
    if any(key.upper() == CLUSTER_VARIABLE and key != CLUSTER_VARIABLE for key in env):
        return None  # pydantic's settings match names in any case: let them decide
    if CLUSTER_VARIABLE in env:
        value = env[CLUSTER_VARIABLE]
        return value if value and value == value.strip() else None  # the settings read it exactly
    cwd = cwd or Path.cwd()
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect")
    files = [cwd / "prefect.toml", cwd / "pyproject.toml", cwd / ".env",
             Path(env.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")]
    for file in files:
        try:
            text = file.read_text(errors="replace").lower()
        except OSError:
            continue
        if "cluster_block" in text:
            return None
    return DEFAULT_CLUSTER


def read_boosts(include_ended: bool = False, env: Optional[dict] = None) -> Optional[list[Boost]]:
    """Live boosts (or every boost) of this process's cluster, newest first, as
    ``BoostStore.list`` returns them; None when this read cannot answer and Prefect's client must."""
    api = api_from_environment(env)
    cluster = cluster_from_environment(env)
    if api is None or cluster is None:
        return None
    import httpx

    url, headers = api
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_SECONDS) as client:
            boosts = {b.id: b for b in _read_type(client, BOOST_SLUG, cluster)}
            if include_ended:
                boosts.update((b.id, b) for b in _read_type(client, BOOST_HISTORY_SLUG, cluster))  # history wins
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None  # the full client reads again, and reports what is wrong
    return sorted(boosts.values(), key=lambda b: b.created_at, reverse=True)


def _read_type(client, slug: str, cluster: str) -> list[Boost]:
    """Every document of one block type, paged by name (the route BoostStore uses)."""
    found = client.get(f"/block_types/slug/{slug}")
    if found.status_code == 404:
        return []  # never registered on this server: no boost was ever recorded
    found.raise_for_status()
    type_id = found.json()["id"]
    boosts: list[Boost] = []
    offset = 0
    while True:
        response = client.post("/block_documents/filter", json=documents_page(type_id, offset))
        response.raise_for_status()
        page = response.json()
        offset += len(page)
        boosts.extend(boost_from_data(doc["data"]) for doc in page
                      if doc.get("data", {}).get("boost_id") and in_cluster(doc["data"], cluster))
        if len(page) < PAGE:
            return boosts
