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

from grid_flows.core.models import DEFAULT_CLUSTER, Boost, Resources

BOOST_SLUG = "grid-boost"  # live boosts
BOOST_HISTORY_SLUG = "grid-boost-history"  # ended boosts, kept for the record
PAGE = 200  # documents per read of a record list


def documents_page(type_id: str, offset: int) -> dict:
    """The body of ``POST /block_documents/filter`` for one page of a block type's documents, by
    name. By type id, not slug: the server answers a slug filter with a check per document of every
    type; the (block_type_id, name) index serves this one. This route honours offset and limit; the
    per-type route (``read_block_documents_by_type``) ignores both, so paging over it never ends."""
    return {"block_documents": {"block_type_id": {"any_": [type_id]}},
            "sort": "NAME_ASC", "offset": offset, "limit": PAGE, "include_secrets": False}


# The document's own names for the resources, and display copies with units (GridBoost).
_NOT_BOOST_FIELDS = frozenset({"boost_id", "cpu", "gpu", "memory_bytes", "memory", "duration"})


def boost_from_data(data: dict) -> Boost:
    """A Boost from a GridBoost document's data (as read from the API)."""
    return Boost(
        id=data["boost_id"],
        resources=Resources(cpu=data.get("cpu", 0), gpu=data.get("gpu", 0), memory=data.get("memory_bytes", 0)),
        **{k: v for k, v in data.items() if k not in _NOT_BOOST_FIELDS},
    )


def in_cluster(data: dict, cluster: str) -> bool:
    """Whether a GridBoost document's data belongs to ``cluster`` (unnamed: written before
    clusters were named, by the only cluster there was, ``DEFAULT_CLUSTER``)."""
    return data.get("cluster", DEFAULT_CLUSTER) == cluster


def boost_document_name(boost_id: str) -> str:
    return f"boost-{boost_id}"
