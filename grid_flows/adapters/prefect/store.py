"""The Prefect adapter: boost records in blocks, the cluster block, artifacts and events.

One block document per boost (``boost-<id>``): creating a document with a new name is
atomic, so concurrent requesters never overwrite each other. Blocks have no
compare-and-swap (docs/architecture.md, "Records"), so changes to an existing record happen under
the cluster's ledger lock (``grid_flows.adapters.ray.cluster.ledger_lock``).

Example:
    ```python
    from grid_flows.adapters.prefect.store import BoostStore
    with BoostStore() as store:
        for boost in store.list():
            print(boost.id, boost.state.value)
    ```
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import ssl
from datetime import datetime
from typing import Iterable
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentCreate, BlockDocumentUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from grid_flows.adapters.prefect.blocks import GridBoost, GridBoostHistory, GridCluster
from grid_flows.adapters.prefect.records import PAGE, boost_document_name, boost_from_data, documents_page, in_cluster
from grid_flows.core.models import DEFAULT_CLUSTER, Boost, ClusterSpec, Resources, cluster_scoped, utcnow
from grid_flows.errors import ForeignBoost, GridError, InvalidRequest, UnknownBoost
from grid_flows.adapters.prefect.settings import GridSettings
from grid_flows.adapters.prefect.transport import GridTransport
from grid_flows.core.units import NO_VALUE, format_amount, format_bytes, format_duration
from grid_flows.errors import ClusterNotConfigured

BOOSTS_ARTIFACT_KEY = "grid-boosts"  # the default cluster's; another's is boosts_artifact_key(name)
PLACEMENTS_ARTIFACT_KEY = "grid-placements"  # one version per flow run, attached to it: a row per task run
MIN_PREFIX = 4  # shortest boost id prefix accepted by release/extend
BOOST_ID_LENGTH = 32  # uuid4().hex
_HEX = re.compile(r"[0-9a-f]+")
_FLOW_RUN_ID = re.compile(r"^flow run .* \(([0-9a-f-]{36})\)$")  # the form control.boosts.requested_by writes
logger = logging.getLogger("grid_flows.adapters.prefect.store")



_registered_types: dict[tuple, tuple[UUID, UUID]] = {}


@functools.lru_cache(maxsize=4)
def _tls_context_for(skip_verify: bool, cafile: str) -> ssl.SSLContext:
    # Prefect's client builds exactly this, from scratch, for every client (loading the CA
    # bundle costs ~20 ms, a tenth of a grant here); one per process is enough.
    if skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile)


def publish_run_table(key: str, rows: list[dict], description: str, flow_run_id) -> None:
    """A table artifact on flow run ``flow_run_id``, named explicitly: after a run's context
    is gone (a task runner's ``__exit__``), ``create_table_artifact`` would attach it to nothing."""
    from prefect.client.schemas.actions import ArtifactCreate

    with api_client() as client:
        client.create_artifact(ArtifactCreate(key=key, type="table", data=json.dumps(rows), description=description,
                                              flow_run_id=flow_run_id))


def api_client():
    """``get_client(sync_client=True)``, reusing one TLS context per process (same settings as
    Prefect's own) and sending writes through ``GridTransport`` (one at a time, a 503 resent
    within milliseconds); inside a flow or task run, the run's client. Use as a context manager."""
    import certifi
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_ENABLE_HTTP2, PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    if SyncClientContext.get() is not None:
        return get_client(sync_client=True)
    context = _tls_context_for(bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
                               PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    # A transport of our own replaces the client's pool: give it the limits Prefect gives its own.
    transport = GridTransport(httpx.HTTPTransport(
        verify=context, http2=bool(PREFECT_API_ENABLE_HTTP2.value()),
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=25),
    ))
    return get_client(sync_client=True, httpx_settings={"verify": context, "transport": transport})


def _register(block_cls: type) -> tuple[UUID, UUID]:
    """The block's (schema id, type id) on the current server, registering it once per process."""
    from prefect.settings import PREFECT_API_URL

    key = (PREFECT_API_URL.value(), block_cls.get_block_type_slug())
    if key not in _registered_types:
        # _sync: Prefect dispatches to the coroutine inside a running event loop (an async flow).
        block_cls.register_type_and_schema(_sync=True)
        _registered_types[key] = (block_cls._block_schema_id, block_cls._block_type_id)
    return _registered_types[key]


def _document_data(block_cls: type, boost: Boost) -> dict:
    # What Block._to_block_document stores, without its JSON-schema work (~100 ms a call).
    return {**block_cls.from_boost(boost).model_dump(mode="json"), "block_type_slug": block_cls.get_block_type_slug()}


class BoostStore:
    """Durable boost records in Prefect; use as a context manager to reuse one API client."""

    def __init__(self, cluster: str | None = None) -> None:
        # The GridCluster block whose records this store reads and writes; others' are invisible.
        self.cluster = cluster or GridSettings().cluster_block
        self._client_cm = None
        self._client = None
        self._doc_ids: dict[str, UUID] = {}
        self._history_ids: dict[str, UUID] = {}

    def __enter__(self) -> "BoostStore":
        self._client_cm = api_client()
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
    #
    # Live boosts (pending, active) are GridBoost documents; an ended boost moves to a
    # GridBoostHistory document of the same name. So the hot paths (grant, expire on
    # touch, the grid-boosts table) read only the few live records, however long the
    # history grows. A crash between the two writes of a move leaves both documents;
    # the history copy wins and the next save or reconcile removes the live one.

    def create(self, boost: Boost) -> None:
        """Write a new live record; fails if a record with this id exists (atomic by name)."""
        if boost.cluster != self.cluster:
            raise GridError(f"boost {boost.id} belongs to cluster '{boost.cluster}', not '{self.cluster}'")
        try:
            self._create(GridBoost, boost)
        except ObjectAlreadyExists:
            raise GridError(f"boost {boost.id} already has a record") from None

    def _create(self, block_cls: type, boost: Boost) -> None:
        schema_id, type_id = _register(block_cls)
        created = self.client.create_block_document(
            block_document=BlockDocumentCreate(
                name=boost_document_name(boost.id),
                block_schema_id=schema_id,
                block_type_id=type_id,
                data=_document_data(block_cls, boost),
            )
        )
        if block_cls is GridBoost:
            self._doc_ids[boost.id] = created.id

    def save(self, boost: Boost) -> None:
        """Write a changed record; an ended boost moves to the history.

        Call under ``grid_flows.adapters.ray.cluster.ledger_lock()`` when others may write the record.
        """
        if boost.state.ended:
            try:
                self._create(GridBoostHistory, boost)
            except ObjectAlreadyExists:
                self._update(GridBoostHistory, self._history_doc(boost.id).id, boost)
            self.delete(boost.id)
            return
        self._update(GridBoost, self._doc_id(boost.id), boost)

    def _update(self, block_cls: type, doc_id: UUID, boost: Boost) -> None:
        schema_id, _ = _register(block_cls)
        self.client.update_block_document(
            block_document_id=doc_id,
            block_document=BlockDocumentUpdate(block_schema_id=schema_id, data=_document_data(block_cls, boost)),
        )

    def delete(self, boost_id: str) -> None:
        """Remove the live record (a request that never held anything leaves no trace)."""
        with contextlib.suppress(ObjectNotFound, UnknownBoost):
            self.client.delete_block_document(self._doc_id(boost_id))
        self._doc_ids.pop(boost_id, None)

    def get(self, boost_id: str) -> Boost:
        """The record of a boost of this cluster, live or ended."""
        with contextlib.suppress(ObjectNotFound):
            return self._mine(boost_from_data(self._history_doc(boost_id).data))
        try:
            doc = self.client.read_block_document_by_name(
                name=boost_document_name(boost_id), block_type_slug=GridBoost.get_block_type_slug()
            )
        except ObjectNotFound:
            raise UnknownBoost(f"unknown boost '{boost_id}'") from None
        boost = self._mine(boost_from_data(doc.data))
        self._doc_ids[boost_id] = doc.id
        return boost

    def _mine(self, boost: Boost) -> Boost:
        if boost.cluster != self.cluster:
            raise ForeignBoost(
                f"boost '{boost.id}' belongs to cluster '{boost.cluster}', not to '{self.cluster}' "
                "(PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK names the cluster)")
        return boost

    def _history_doc(self, boost_id: str):
        return self.client.read_block_document_by_name(
            name=boost_document_name(boost_id), block_type_slug=GridBoostHistory.get_block_type_slug()
        )

    def list(self, include_ended: bool = False) -> list[Boost]:
        """Live boost records (or every record), newest first."""
        live = {}
        for doc in self._all_docs(GridBoost):
            if doc.data.get("boost_id") and in_cluster(doc.data, self.cluster):
                self._doc_ids[doc.data["boost_id"]] = doc.id
                live[doc.data["boost_id"]] = boost_from_data(doc.data)
        boosts = dict(live)
        if include_ended:
            boosts.update((b.id, b) for b in self.history())  # history wins
        return sorted(boosts.values(), key=lambda b: b.created_at, reverse=True)

    def _all_docs(self, block_cls: type) -> list:
        """Every document of ``block_cls``, paged by name (``records.documents_page`` says why so)."""
        from prefect.client.schemas.objects import BlockDocument

        _, type_id = _register(block_cls)
        docs: list = []
        while True:
            response = self.client.request("POST", "/block_documents/filter",
                                           json=documents_page(str(type_id), len(docs)))
            page = BlockDocument.model_validate_list(response.json())
            docs.extend(page)
            if len(page) < PAGE:
                return docs

    def history(self) -> list[Boost]:
        """Every ended record (bounded by the retention rule that reconcile applies)."""
        ended: dict[str, Boost] = {}  # by id: a page read while records end may repeat one
        for doc in self._all_docs(GridBoostHistory):
            if doc.data.get("boost_id") and in_cluster(doc.data, self.cluster):
                self._history_ids[doc.data["boost_id"]] = doc.id
                ended[doc.data["boost_id"]] = boost_from_data(doc.data)
        return list(ended.values())

    def prune_history(self, history: Iterable[Boost], keep: int, max_age_seconds: float,
                      now: datetime | None = None) -> list[str]:
        """Delete the ended records of ``history`` beyond the newest ``keep`` or older than
        ``max_age_seconds`` (by when they ended); the ids deleted. Nothing decides from the
        history: it is what ``grid boost status --all`` shows."""
        now = now or utcnow()
        newest_first = sorted(history, key=lambda b: b.ended_at or b.created_at, reverse=True)
        deleted = []
        for rank, boost in enumerate(newest_first):
            age = (now - (boost.ended_at or boost.created_at)).total_seconds()
            if rank >= keep or age > max_age_seconds:
                with contextlib.suppress(ObjectNotFound):
                    doc_id = self._history_ids.get(boost.id) or self._history_doc(boost.id).id
                    self.client.delete_block_document(doc_id)
                deleted.append(boost.id)
        return deleted

    def resolve(self, id_or_prefix: str, boosts: Iterable[Boost] | None = None) -> Boost:
        """The boost whose id is ``id_or_prefix`` or uniquely starts with it (at least
        MIN_PREFIX characters: a shorter prefix could name a boost its user never saw)."""
        if not isinstance(id_or_prefix, str):
            raise InvalidRequest(f"boost id must be a string, got {type(id_or_prefix).__name__} {id_or_prefix!r}")
        text = id_or_prefix.strip().lower()
        if not text:
            raise UnknownBoost("boost id is empty")
        if not _HEX.fullmatch(text):
            raise UnknownBoost(f"unknown boost '{id_or_prefix}': boost ids are hexadecimal")
        if len(text) < MIN_PREFIX:
            raise InvalidRequest(f"boost id prefix '{id_or_prefix}' is too short: give at least {MIN_PREFIX} characters")
        if boosts is None:
            if len(text) == BOOST_ID_LENGTH:
                return self.get(text)  # one read by name, however long the history is
            boosts = self.list()
            if len(text) < 8 or not any(b.id.startswith(text) for b in boosts):
                # ended boosts can be named too; a short prefix must be unique among them as well
                boosts = self.list(include_ended=True)
        else:
            boosts = list(boosts)
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

    # -- what the UI shows -------------------------------------------------------------

    def publish_boosts_table(self, boosts: Iterable[Boost] | None = None, now: datetime | None = None) -> None:
        """Refresh the ``grid-boosts`` table artifact with the live boosts (read now if not
        given). Never raises: the records are durable already, the table is a view."""
        try:
            self._publish_boosts_table(self.list() if boosts is None else boosts, now or utcnow())
        except Exception as exc:
            logger.warning("could not update the %s artifact: %s", boosts_artifact_key(self.cluster), exc)

    def _publish_boosts_table(self, boosts: Iterable[Boost], now: datetime) -> None:
        from prefect.client.schemas.actions import ArtifactCreate
        from prefect.utilities.context import get_task_and_flow_run_ids

        live = [b for b in boosts if not b.state.ended]
        rows = [boost_row(b, now) for b in live] or [{column: "" for column in BOOST_COLUMNS} | {"Boost": "(no live boosts)"}]
        # What prefect.artifacts.create_table_artifact sends, through this store's client
        # instead of a new one per artifact; attached only to grid-flows' own runs, never to a
        # user's flow run that asked for a boost.
        task_run_id, flow_run_id = get_task_and_flow_run_ids() if _in_grid_flow_run() else (None, None)
        self.client.create_artifact(
            ArtifactCreate(
                type="table",
                key=boosts_artifact_key(self.cluster),
                data=json.dumps(rows),
                description=f"Live grid-flows boosts of cluster {self.cluster} at {now:%Y-%m-%d %H:%M:%S} UTC. "
                f"Lent in total: {_totals(live)}. "
                "A boost runs its tasks on the source node, inside a Ray placement group.",
                task_run_id=task_run_id,
                flow_run_id=flow_run_id,
            )
        )

    def emit(self, event: str, boost: Boost, **extra: str) -> None:
        """Emit ``grid.boost.<what>`` with resource id ``grid.boost.<id>``; the source and target
        nodes (:func:`node_resource_id`, roles ``lender`` and ``borrower``) and the flow run that asked,
        if one did, are related resources, so the event feed's filters and Details tab find them."""
        from prefect.events import emit_event

        related = [
            {"prefect.resource.id": node_resource_id(boost.cluster, boost.source), "prefect.resource.role": "lender",
             "prefect.resource.name": boost.source},
            {"prefect.resource.id": node_resource_id(boost.cluster, boost.target), "prefect.resource.role": "borrower",
             "prefect.resource.name": boost.target},
        ]
        flow_run = _FLOW_RUN_ID.search(boost.requested_by or "")
        if flow_run:
            related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run.group(1)}",
                            "prefect.resource.role": "flow-run"})
        try:
            emit_event(
                event=event,
                resource={
                    "prefect.resource.id": f"grid.boost.{boost.id}",
                    "prefect.resource.name": f"boost {boost.short_id} {boost.source}->{boost.target}",
                    "grid.source": boost.source,
                    "grid.target": boost.target,
                    "grid.priority": boost.priority.value,
                    "grid.cluster": boost.cluster,
                },
                related=related,
                payload={
                    "state": boost.state.value,
                    "resources": boost.resources.describe(),  # "2 CPU, 4 GiB": units a person reads
                    "cpu": boost.resources.cpu,
                    "gpu": boost.resources.gpu,
                    "memory_bytes": boost.resources.memory,
                    "expires_at": boost.expires_at.isoformat(),
                    "reason": boost.reason,
                    **({"preempted_by": boost.preempted_by} if boost.preempted_by else {}),
                    **extra,
                },
            )
        except Exception as exc:
            logger.warning("could not emit %s for boost %s: %s", event, boost.id, exc)

    # -- the cluster definition --------------------------------------------------------

    def load_cluster(self, name: str | None = None) -> ClusterSpec:
        name = name or self.cluster
        try:
            doc = self.client.read_block_document_by_name(
                name=name, block_type_slug=GridCluster.get_block_type_slug()
            )
        except ObjectNotFound:
            raise ClusterNotConfigured(
                f"no GridCluster block named '{name}': run `grid blocks apply blocks/cluster.yaml` first"
            ) from None
        return GridCluster.model_validate(doc.data).to_spec(name=name)

    def save_cluster(self, spec: ClusterSpec, name: str | None = None) -> UUID:
        """Save ``spec`` as the GridCluster block ``name`` (default: this store's cluster)."""
        name = name or self.cluster
        _register(GridCluster)
        saved = GridCluster.from_spec(spec).save(name, overwrite=True, _sync=True)
        for listener in CLUSTER_SAVED_LISTENERS:
            listener(name)
        return saved


# Called with the block name after save_cluster: the boost controller (control.client) reads
# the definition again at once instead of within its cache time.
CLUSTER_SAVED_LISTENERS: list = []


def boosts_artifact_key(cluster: str) -> str:
    """The ``grid-boosts`` table's key: one table per cluster on a shared server."""
    return cluster_scoped(BOOSTS_ARTIFACT_KEY, cluster)


def node_resource_id(cluster: str, node: str) -> str:
    """A node's id in Prefect events: ``grid.node.<node>``, or ``grid.node.<cluster>.<node>`` for a
    cluster other than the default one, so two clusters' ``gpu1`` stay apart in the event feed."""
    return f"grid.node.{node}" if cluster == DEFAULT_CLUSTER else f"grid.node.{cluster}.{node}"


def _in_grid_flow_run() -> bool:
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    return run is not None and run.flow is not None and run.flow.name.startswith("grid-")


def boost_row(boost: Boost, now: datetime) -> dict[str, str]:
    """One human-readable table row: units, no JSON."""
    r = boost.resources
    none = NO_VALUE
    # State and time first, the short id after: at 1280 px a 32-character id pushed them off.
    overdue = boost.is_overdue(now)
    return {
        "State": "overdue" if overdue else boost.state.value,
        "Time left": f"{format_duration(boost.seconds_left(now))} left" if not (boost.state.ended or overdue) else none,
        "Boost": boost.short_id,
        "Source → Target": f"{boost.source} → {boost.target}",
        "CPU": f"{format_amount(r.cpu)} CPU" if r.cpu else none,
        "GPU": f"{format_amount(r.gpu)} GPU" if r.gpu else none,
        "Memory": format_bytes(r.memory) if r.memory else none,
        "Priority": boost.priority.value,
        "Requested by": boost.requested_by or none,
        "Expires at (UTC)": f"{boost.expires_at:%Y-%m-%d %H:%M:%S}",
    }


BOOST_COLUMNS = ("State", "Time left", "Boost", "Source → Target", "CPU", "GPU", "Memory", "Priority", "Requested by",
                 "Expires at (UTC)")


def _totals(boosts: Iterable[Boost]) -> str:
    return sum((b.resources for b in boosts), Resources()).describe()
