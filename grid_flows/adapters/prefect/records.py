"""The boost record format: block type slugs, document names, and a Boost from a document's data.

Pure (no ``import prefect``), so the light status read (``quick_read``) shares it with the
block classes in ``blocks``.

Example:
    ```python
    from grid_flows.adapters.prefect.records import boost_document_name, boost_from_data

    boost_document_name("3f2a9c1b")   # 'boost-3f2a9c1b'
    ```
"""

from __future__ import annotations

from grid_flows.core.models import Boost, Resources

BOOST_SLUG = "grid-boost"  # live boosts
BOOST_HISTORY_SLUG = "grid-boost-history"  # ended boosts, kept for the record


def boost_from_data(data: dict) -> Boost:
    """A Boost from a GridBoost document's data (as read from the API)."""
    return Boost(
        id=data["boost_id"],
        resources=Resources(cpu=data.get("cpu", 0), gpu=data.get("gpu", 0), memory=data.get("memory_bytes", 0)),
        **{k: v for k, v in data.items() if k not in {"boost_id", "cpu", "gpu", "memory_bytes"}},
    )


def boost_document_name(boost_id: str) -> str:
    return f"boost-{boost_id}"
