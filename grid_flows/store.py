"""The Prefect adapter: boost records in blocks, the ledger lock, artifacts and events.

One block document per boost (``boost-<id>``): creating a document with a new name is
atomic, so concurrent requesters never overwrite each other. Changes to an existing
record happen under a global concurrency limit of 1 used as a lock, because blocks
have no compare-and-swap (DESIGN.md section 4).

Example:
    ```python
    from grid_flows.store import BoostStore
    with BoostStore() as store:
        for boost in store.list():
            print(boost.id, boost.state.value)
    ```
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from datetime import datetime
from typing import Iterable, Iterator
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    BlockDocumentCreate,
    BlockDocumentUpdate,
    GlobalConcurrencyLimitCreate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from grid_flows.blocks import GridBoost, GridCluster, boost_document_name, boost_from_data
from grid_flows.models import Boost, ClusterSpec, GridError, Resources, UnknownBoost, utcnow
from grid_flows.settings import GridSettings
from grid_flows.units import format_amount, format_bytes, format_duration

LOCK_NAME = "grid-ledger"
BOOSTS_ARTIFACT_KEY = "grid-boosts"
logger = logging.getLogger("grid_flows.store")


class StoreUnavailable(GridError):
    """The Prefect API could not be reached or refused a request."""


class ClusterNotConfigured(GridError):
    exit_code = 2


_registered_types: set[str] = set()
_ensured_lock = False


def _register(block_cls: type) -> None:
    # Registering a block type and schema costs several API calls: once per process.
    slug = block_cls.get_block_type_slug()
    if slug not in _registered_types:
        block_cls.register_type_and_schema()
        _registered_types.add(slug)


class BoostStore:
    """Durable boost records in Prefect; use as a context manager to reuse one API client."""

    def __init__(self) -> None:
        self._client_cm = None
        self._client = None
        self._doc_ids: dict[str, UUID] = {}

    def __enter__(self) -> "BoostStore":
        self._client_cm = get_client(sync_client=True)
        self._client = self._client_cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client_cm is not None:
            self._client_cm.__exit__(*exc)
        self._client_cm = self._client = None

    @property
    def client(self):
        if self._client is None:
            raise RuntimeError("use BoostStore as a context manager: `with BoostStore() as store:`")
        return self._client

    # -- records ---------------------------------------------------------------------

    def create(self, boost: Boost) -> None:
        """Write a new record; fails if a record with this id exists (atomic by name)."""
        _register(GridBoost)
        block = GridBoost.from_boost(boost)
        doc = block._to_block_document(name=boost_document_name(boost.id), include_secrets=True)
        create = BlockDocumentCreate(
            **doc.model_dump(include={"name", "block_schema_id", "block_type_id", "data", "is_anonymous"})
        )
        try:
            created = self.client.create_block_document(block_document=create)
        except ObjectAlreadyExists:
            raise GridError(f"boost {boost.id} already has a record") from None
        self._doc_ids[boost.id] = created.id

    def save(self, boost: Boost) -> None:
        """Overwrite an existing record. Call under :meth:`lock` when others may write it."""
        _register(GridBoost)
        doc_id = self._doc_id(boost.id)
        doc = GridBoost.from_boost(boost)._to_block_document(
            name=boost_document_name(boost.id), include_secrets=True
        )
        self.client.update_block_document(
            block_document_id=doc_id,
            block_document=BlockDocumentUpdate(**doc.model_dump(include={"block_schema_id", "data"})),
        )

    def delete(self, boost_id: str) -> None:
        with contextlib.suppress(ObjectNotFound, UnknownBoost):
            self.client.delete_block_document(self._doc_id(boost_id))
        self._doc_ids.pop(boost_id, None)

    def get(self, boost_id: str) -> Boost:
        try:
            doc = self.client.read_block_document_by_name(
                name=boost_document_name(boost_id), block_type_slug=GridBoost.get_block_type_slug()
            )
        except ObjectNotFound:
            raise UnknownBoost(f"unknown boost '{boost_id}'") from None
        self._doc_ids[boost_id] = doc.id
        return boost_from_data(doc.data)

    def list(self) -> list[Boost]:
        """Every boost record, newest first."""
        try:
            docs = []
            offset = 0
            while True:
                page = self.client.read_block_documents_by_type(
                    GridBoost.get_block_type_slug(), offset=offset, limit=200
                )
                docs.extend(page)
                if len(page) < 200:
                    break
                offset += 200
        except ObjectNotFound:
            return []  # the block type is registered by the first boost ever made
        boosts = []
        for doc in docs:
            if doc.data.get("boost_id"):
                self._doc_ids[doc.data["boost_id"]] = doc.id
                boosts.append(boost_from_data(doc.data))
        return sorted(boosts, key=lambda b: b.created_at, reverse=True)

    def resolve(self, id_or_prefix: str, boosts: Iterable[Boost] | None = None) -> Boost:
        """The boost whose id is ``id_or_prefix`` or uniquely starts with it."""
        text = id_or_prefix.strip().lower()
        if not text:
            raise UnknownBoost("boost id is empty")
        boosts = list(boosts) if boosts is not None else self.list()
        exact = [b for b in boosts if b.id == text]
        if exact:
            return exact[0]
        matches = [b for b in boosts if b.id.startswith(text)]
        if not matches:
            raise UnknownBoost(f"unknown boost '{id_or_prefix}'")
        if len(matches) > 1:
            ids = ", ".join(b.id for b in matches[:5])
            raise UnknownBoost(f"boost id prefix '{id_or_prefix}' is ambiguous: it matches {ids}")
        return matches[0]

    def _doc_id(self, boost_id: str) -> UUID:
        if boost_id not in self._doc_ids:
            self.get(boost_id)
        return self._doc_ids[boost_id]

    # -- the ledger lock -------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise read-modify-write of records across every process of the cluster."""
        from prefect.concurrency.sync import concurrency

        self._ensure_lock()
        try:
            with concurrency(
                LOCK_NAME,
                occupy=1,
                strict=True,
                lease_duration=60,
                timeout_seconds=GridSettings().lock_timeout_seconds,
            ):
                yield
        except TimeoutError:
            raise GridError(
                f"the ledger lock '{LOCK_NAME}' stayed busy for {GridSettings().lock_timeout_seconds:g} s"
            ) from None

    def _ensure_lock(self) -> None:
        global _ensured_lock
        if _ensured_lock:
            return
        with contextlib.suppress(ObjectAlreadyExists):
            self.client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=LOCK_NAME, limit=1, active=True)
            )
        _ensured_lock = True

    # -- what the UI shows -------------------------------------------------------------

    def publish_boosts_table(self, boosts: Iterable[Boost], now: datetime | None = None) -> None:
        """Refresh the ``grid-boosts`` table artifact with the live boosts."""
        from prefect.artifacts import create_table_artifact

        now = now or utcnow()
        live = [b for b in boosts if not b.state.ended]
        rows = [boost_row(b, now) for b in live] or [{column: "" for column in BOOST_COLUMNS} | {"Boost": "(no live boosts)"}]
        totals = _totals(live)
        try:
            with warnings.catch_warnings():
                # Outside a flow run Prefect warns that unattached artifacts are deprecated;
                # the grid-boosts table is a cluster-wide view, not one run's output.
                warnings.simplefilter("ignore", FutureWarning)
                create_table_artifact(
                    table=rows,
                    key=BOOSTS_ARTIFACT_KEY,
                    description=f"Live grid-flows boosts at {now:%Y-%m-%d %H:%M:%S} UTC. Lent in total: {totals}. "
                    "A boost runs its tasks on the source node, inside a Ray placement group.",
                )
        except Exception as exc:  # the record is durable already; the table is a view
            logger.warning("could not update the %s artifact: %s", BOOSTS_ARTIFACT_KEY, exc)

    def emit(self, event: str, boost: Boost, **extra: str) -> None:
        """Emit ``grid.boost.<what>`` with resource id ``grid.boost.<id>``."""
        from prefect.events import emit_event

        try:
            emit_event(
                event=event,
                resource={
                    "prefect.resource.id": f"grid.boost.{boost.id}",
                    "prefect.resource.name": f"boost {boost.short_id} {boost.source}->{boost.target}",
                    "grid.source": boost.source,
                    "grid.target": boost.target,
                    "grid.priority": boost.priority.value,
                },
                payload={
                    "state": boost.state.value,
                    "cpu": boost.resources.cpu,
                    "gpu": boost.resources.gpu,
                    "memory_bytes": boost.resources.memory,
                    "expires_at": boost.expires_at.isoformat(),
                    "reason": boost.reason,
                    **extra,
                },
            )
        except Exception as exc:
            logger.warning("could not emit %s for boost %s: %s", event, boost.id, exc)

    # -- the cluster definition --------------------------------------------------------

    def load_cluster(self, name: str | None = None) -> ClusterSpec:
        name = name or GridSettings().cluster_block
        try:
            doc = self.client.read_block_document_by_name(
                name=name, block_type_slug=GridCluster.get_block_type_slug()
            )
        except ObjectNotFound:
            raise ClusterNotConfigured(
                f"no GridCluster block named '{name}': run `grid blocks apply blocks/cluster.yaml` first"
            ) from None
        return GridCluster.model_validate(doc.data).to_spec(name=name)

    def save_cluster(self, spec: ClusterSpec, name: str = "default") -> UUID:
        _register(GridCluster)
        return GridCluster.from_spec(spec).save(name, overwrite=True)


def boost_row(boost: Boost, now: datetime) -> dict[str, str]:
    """One human-readable table row: units, no JSON."""
    r = boost.resources
    return {
        "Boost": boost.id,
        "Source → Target": f"{boost.source} → {boost.target}",
        "CPU": format_amount(r.cpu) if r.cpu else "-",
        "GPU": format_amount(r.gpu) if r.gpu else "-",
        "Memory": format_bytes(r.memory) if r.memory else "-",
        "Priority": boost.priority.value,
        "State": boost.state.value,
        "Time left": f"{format_duration(boost.seconds_left(now))} left" if not boost.state.ended else "-",
        "Expires at (UTC)": f"{boost.expires_at:%Y-%m-%d %H:%M:%S}",
    }


BOOST_COLUMNS = ("Boost", "Source → Target", "CPU", "GPU", "Memory", "Priority", "State", "Time left", "Expires at (UTC)")


def _totals(boosts: Iterable[Boost]) -> str:
    total = Resources()
    for b in boosts:
        total = total + b.resources
    return total.describe()
