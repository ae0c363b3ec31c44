"""The boost controller: one detached Ray actor per cluster that owns the boost records and time.

Every request, release, extension and end of a boost goes through it (``control.boosts``
routes them here through ``control.client``). It runs the same operations as before, with
two differences that make it fast and punctual:

* it keeps the live records in memory (``Memory``) and writes each change to Prefect
  before it answers, so a grant costs one durable write and no reads;
* a timer ends each boost at its deadline (``ledger.due_to_end``), whether or not any
  process or maintenance flow touches the ledger, and runs reconcile as soon as Ray marks
  the lender of a live boost dead (so ``grid.boost.lost`` follows a lender's death within
  seconds, not at the next scheduled reconcile).

The ``grid-boosts`` artifact and the ``grid.boost.*`` events leave the hot path: a publisher
thread sends them in the background, the events in order and the table coalesced (the last
state is always published). On (re)start the controller rebuilds its memory from the
block documents and Ray's placement groups through ``boosts.reconcile``.

Example:
    ```python
    import ray
    from grid_flows.control import client

    handle = client.controller()          # started on first use, on the head node
    ray.get(handle.status.remote(), timeout=10)
    # {'cluster': 'default', 'version': 3, 'live': 1, 'durable': 1, 'held': 0, ...}
    ```
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Iterable, Iterator

from grid_flows.adapters.prefect.store import BoostStore, GridBoost
from grid_flows.core import ledger
from grid_flows.core.models import Boost, ClusterSpec, utcnow
from grid_flows.errors import GridError, LedgerBusy

logger = logging.getLogger("grid_flows.control.controller")

CONTROLLER_PREFIX = "grid-controller-"
SPEC_TTL_SECONDS = 2.0  # an edit of the cluster block in the UI reaches the controller within this
RESYNC_SECONDS = 15.0  # re-read the live records: a process with the controller off may have written
MAX_SLEEP_SECONDS = 1.0  # the timer wakes at least this often (a new spec may change the grace)
LENDER_CHECK_SECONDS = 2.0  # how often the timer asks Ray whether the lenders of live boosts are up
LOG_SIZE = 4096  # changes kept for watch(); a watcher further behind gets the whole live set
OPERATIONS = frozenset({
    "request", "release", "extend", "end_boost", "expire_due", "reconcile", "hold", "unhold",
})


class Memory:
    """The live records (pending claims, active boosts) the controller keeps, and a change log.

    ``durable`` names the records written to Prefect: a claim lives only here until its grant
    is written (so a grant costs one write); after a crash its group has no record and the
    rebuild removes it, and its caller, never answered, retries with the same request key."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.live: dict[str, Boost] = {}
        self.durable: set[str] = set()
        self.held: set[str] = set()  # boosts a running flow routes tasks into: they get the grace
        self.doc_ids: dict = {}  # boost id -> its GridBoost document id, for every thread's store
        self.version = 0
        self.floor = 0  # the log holds every change after this version (older ones fell off)
        self.log: deque[tuple[int, Boost]] = deque(maxlen=LOG_SIZE)
        self.touched: dict[str, int] = {}  # boost id -> the version of its last change here

    def put(self, boost: Boost, *, durable: bool) -> None:
        with self.cond:
            if boost.state.ended:
                self.live.pop(boost.id, None)
                self.durable.discard(boost.id)
                self.held.discard(boost.id)
                if len(self.touched) > LOG_SIZE:  # ended ones are only needed during a resync's read
                    for old_id in [i for i in self.touched if i not in self.live][: LOG_SIZE // 2]:
                        del self.touched[old_id]
            else:
                self.live[boost.id] = boost
                if not durable:  # a claim: not a change a watcher can rely on until it is written
                    self.cond.notify_all()
                    return
                self.durable.add(boost.id)
            self._changed(boost)

    def drop_claim(self, boost_id: str) -> None:
        """A claim that was never granted: gone without a trace (and without a change to watch)."""
        with self.cond:
            self.live.pop(boost_id, None)
            self.durable.discard(boost_id)
            self.touched.pop(boost_id, None)
            self.cond.notify_all()

    def replace_durable(self, records: Iterable[Boost], read_since: int) -> None:
        """The live records as Prefect had them in a read that began at version ``read_since``.

        A record this controller changed after the read began is newer here and is kept;
        claims in flight (not yet durable) stay. Everything else takes Prefect's word: a
        process with the controller off may have granted or ended it."""
        with self.cond:
            fresh = {b.id: b for b in records if not b.state.ended}
            newer = {i for i, v in self.touched.items() if v > read_since}
            gone = [i for i in self.durable if i not in fresh and i not in newer]
            for boost_id, boost in fresh.items():
                if boost_id not in newer and self.live.get(boost_id) != boost:
                    self.live[boost_id] = boost
                    self.durable.add(boost_id)
                    self._changed(boost)
            for boost_id in gone:
                self.live.pop(boost_id, None)
                self.durable.discard(boost_id)
                self.held.discard(boost_id)
            if gone:  # ended behind our back: a watcher needs the whole set
                self.version += 1
                self.log.clear()
                self.floor = self.version
            self.cond.notify_all()

    def snapshot(self) -> list[Boost]:
        with self.cond:
            return list(self.live.values())

    def changes_since(self, version: int) -> tuple[int, list[Boost], bool]:
        """(current version, records changed after ``version``, whether the log reaches back)."""
        with self.cond:
            floor = self.log[0][0] - 1 if len(self.log) == self.log.maxlen else self.floor
            if version < floor:
                return self.version, list(self.live.values()), False
            return self.version, [b for v, b in self.log if v > version], True

    def _changed(self, boost: Boost) -> None:
        self.version += 1
        self.log.append((self.version, boost))
        self.touched[boost.id] = self.version
        self.cond.notify_all()


class ControllerStore(BoostStore):
    """The controller's view of the records: live ones from ``Memory``, every change written
    through to Prefect first; the table and events handed to the publisher. One per thread
    (each keeps its own API client open)."""

    def __init__(self, controller: "BoostController") -> None:
        super().__init__(controller.cluster)
        self._controller = controller
        self._memory = controller.memory
        self._doc_ids = controller.memory.doc_ids  # shared: another thread may have written it

    def __enter__(self) -> "ControllerStore":
        if self._client is None:
            super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # kept open for this thread's next operation

    def create(self, boost: Boost) -> None:
        self._memory.put(boost, durable=False)

    def save(self, boost: Boost) -> None:
        durable = boost.id in self._memory.durable
        if durable:
            super().save(boost)
        elif boost.state.ended:
            self._memory.drop_claim(boost.id)  # a claim that ends was never written
            return
        else:
            self._create(GridBoost, boost)  # the first write of a granted boost
        self._memory.put(boost, durable=True)

    def delete(self, boost_id: str) -> None:
        if boost_id in self._memory.durable:
            super().delete(boost_id)
        self._memory.drop_claim(boost_id)

    def get(self, boost_id: str) -> Boost:
        with self._memory.cond:
            boost = self._memory.live.get(boost_id)
        if boost is not None:
            return boost
        record = super().get(boost_id)  # ended, or written while the controller was off
        if not record.state.ended:
            with self._memory.cond:
                self._memory.live.setdefault(record.id, record)
                self._memory.durable.add(record.id)
        return record

    def list(self, include_ended: bool = False) -> list[Boost]:
        live = {b.id: b for b in self._memory.snapshot()}
        if include_ended:
            live.update((b.id, b) for b in self.history())
        return sorted(live.values(), key=lambda b: b.created_at, reverse=True)

    def _doc_id(self, boost_id: str):
        if boost_id not in self._doc_ids:
            BoostStore.get(self, boost_id)  # the document, by name
        return self._doc_ids[boost_id]

    def read_durable(self) -> list[Boost]:
        """The live records as Prefect has them (for a resync)."""
        return BoostStore.list(self)

    def load_cluster(self, name: str | None = None) -> ClusterSpec:
        return self._controller.spec(self)

    def load_cluster_now(self) -> ClusterSpec:
        return BoostStore.load_cluster(self, self._controller.cluster)

    def publish_boosts_table(self, boosts: Iterable[Boost] | None = None, now: datetime | None = None) -> None:
        self._controller.publisher.table()

    def emit(self, event: str, boost: Boost, **extra: str) -> None:
        self._controller.publisher.event(event, boost, extra)


class Publisher:
    """Sends events (in order, none dropped) and the ``grid-boosts`` table (coalesced: the
    latest live set) from one background thread, off the hot path."""

    def __init__(self, memory: Memory, context, cluster: str) -> None:
        self._memory = memory
        self._context = context  # a callable returning the Prefect settings context to enter
        self._cluster = cluster
        self._cond = threading.Condition()
        self._events: deque[tuple[str, Boost, dict]] = deque()
        self._dirty = False
        self._busy = False
        threading.Thread(target=self._run, name="grid-controller-publisher", daemon=True).start()

    def event(self, event: str, boost: Boost, extra: dict) -> None:
        with self._cond:
            self._events.append((event, boost, extra))
            self._cond.notify_all()

    def table(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything handed over so far is sent; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._events or self._dirty or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        with self._context(), BoostStore(self._cluster) as store:
            while True:
                with self._cond:
                    while not (self._events or self._dirty):
                        self._cond.wait()
                    events, self._events = list(self._events), deque()
                    dirty, self._dirty = self._dirty, False
                    self._busy = True
                try:
                    for name, boost, extra in events:
                        store.emit(name, boost, **extra)
                    if dirty:
                        store.publish_boosts_table(self._memory.snapshot())
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()


class BoostController:
    """The actor body (see the module docstring). Calls run in threads (``max_concurrency``);
    record changes serialise on ``lock()``, as they did across processes on the ledger lock."""

    def __init__(self, cluster: str, settings: dict[str, Any]) -> None:
        from grid_flows.adapters.prefect.task_context import worker_settings
        from grid_flows.control import boosts

        self.cluster = cluster
        self._settings = settings
        self._worker_settings = worker_settings
        self.memory = Memory()
        self._lock = threading.Lock()
        self.reconciling = threading.Lock()  # one reconcile at a time: a second one would judge the same
        self._local = threading.local()
        self._spec: ClusterSpec | None = None
        self._spec_read_at = 0.0
        self._resynced_at = float("-inf")
        self._spec_lock = threading.Lock()
        self.publisher = Publisher(self.memory, self._context, cluster)
        self._enders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grid-controller-end")
        self._ending: set[str] = set()
        self._stopped_watches: set[str] = set()
        self.started_at = utcnow()
        self.rebuild: list[str] = []
        boosts.run_operations_here(self)  # this process is the controller: operations run here
        with self._context():
            from prefect.settings import PREFECT_API_URL

            self.api_url = PREFECT_API_URL.value()
            report = boosts.reconcile()
        self.rebuild = report.lines()
        logger.info("boost controller for cluster %r started: %s", cluster, "; ".join(self.rebuild))
        threading.Thread(target=self._timer, name="grid-controller-timer", daemon=True).start()

    # -- what control.boosts uses here -------------------------------------------------

    def _context(self):
        return self._worker_settings(self._settings)

    def store(self) -> ControllerStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = ControllerStore(self).__enter__()  # its client stays open
        return store

    @contextlib.contextmanager
    def lock(self, timeout_seconds: float | None = None) -> Iterator[None]:
        from grid_flows.adapters.prefect.settings import GridSettings

        timeout_seconds = timeout_seconds or GridSettings().lock_timeout_seconds
        if not self._lock.acquire(timeout=timeout_seconds):
            raise LedgerBusy(f"the controller's ledger lock stayed taken for {timeout_seconds:g} s")
        try:
            yield
        finally:
            self._lock.release()

    def spec(self, store: BoostStore) -> ClusterSpec:
        with self._spec_lock:
            if self._spec is None or time.monotonic() - self._spec_read_at > SPEC_TTL_SECONDS:
                self._spec = store.load_cluster_now()
                self._spec_read_at = time.monotonic()
            return self._spec

    def resync(self, store: ControllerStore, at_most_every: float = 0.0) -> bool:
        """Take the live records from Prefect again, for changes made with the controller off;
        False if one was taken less than ``at_most_every`` seconds ago. Read without the lock
        (grants wait on it); a record changed here during the read is newer than the read and
        kept (``Memory.replace_durable``)."""
        with self._spec_lock:
            if time.monotonic() - self._resynced_at < at_most_every:
                return False
            self._resynced_at = time.monotonic()
        version = self.memory.version
        records = store.read_durable()
        self.memory.replace_durable(records, read_since=version)
        return True

    # -- the actor's methods ------------------------------------------------------------

    def call(self, operation: str, args: tuple, kwargs: dict, api_url: str | None = None) -> tuple[str, Any]:
        """Run ``control.boosts.<operation>`` here; ("ok", result) or ("error", GridError).

        ``api_url``: the caller's Prefect API. Records live in one server: a caller using
        another one would see none of what this controller writes."""
        from grid_flows.control import boosts

        if operation not in OPERATIONS:
            return "error", GridError(f"the boost controller has no operation {operation!r}")
        mine = self.api_url
        if api_url and mine and api_url.rstrip("/") != mine.rstrip("/"):
            return "error", GridError(
                f"the boost controller of cluster '{self.cluster}' keeps its records in the Prefect API at {mine}, "
                f"but this process uses {api_url}; use that API, or stop the controller "
                f"(`ray.kill` the actor {CONTROLLER_PREFIX}{self.cluster}) so the next caller starts it anew")
        try:
            with self._context():
                return "ok", getattr(boosts, operation)(*args, **kwargs)
        except GridError as exc:
            return "error", exc

    def cluster_changed(self) -> None:
        """The cluster block was saved: read it again before the next decision."""
        with self._spec_lock:
            self._spec = None

    def watch(self, since: int, timeout: float, token: str = "") -> dict[str, Any]:
        """Long poll: the records changed after version ``since``, waiting up to ``timeout``
        seconds for one. ``complete`` is false when ``since`` is older than the change log
        (then ``boosts`` is the whole live set). ``stop_watch(token)`` ends a wait at once."""
        deadline = time.monotonic() + max(0.0, min(float(timeout), 60.0))
        with self.memory.cond:
            while self.memory.version <= since and token not in self._stopped_watches:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.memory.cond.wait(left)
            self._stopped_watches.discard(token)
        version, changed, complete = self.memory.changes_since(since)
        return {"version": version, "boosts": changed, "complete": complete}

    def stop_watch(self, token: str) -> None:
        """The watcher is going away: answer its pending watch now (a later one returns at once)."""
        with self.memory.cond:
            self._stopped_watches.add(token)
            self.memory.cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the events and the table of every change so far are published."""
        return self.publisher.flush(timeout)

    def status(self) -> dict[str, Any]:
        import ray

        with self.memory.cond:
            return {"cluster": self.cluster, "node_id": ray.get_runtime_context().get_node_id(),
                    "version": self.memory.version, "live": len(self.memory.live),
                    "durable": len(self.memory.durable), "held": len(self.memory.held),
                    "started_at": self.started_at.isoformat(), "rebuild": list(self.rebuild)}

    # -- time ---------------------------------------------------------------------------

    def _timer(self) -> None:
        """End each boost at its deadline; wake early on any change (a grant may be due sooner)."""
        with self._context():
            last_resync = last_lender_check = time.monotonic()
            while True:
                try:
                    grace = self.grace_seconds()
                    with self.memory.cond:
                        # Boosts being ended right now are not waited for again (no busy loop).
                        live = [b for b in self.memory.live.values() if b.id not in self._ending]
                        due_at = ledger.next_deadline(live, held=set(self.memory.held), grace_seconds=grace)
                        pause = MAX_SLEEP_SECONDS if due_at is None else \
                            min(MAX_SLEEP_SECONDS, max(0.0, (due_at - utcnow()).total_seconds()))
                        version = self.memory.version
                        if pause > 0:
                            self.memory.cond.wait_for(lambda: self.memory.version != version, timeout=pause)
                    for boost, reason in ledger.due_to_end(self.memory.snapshot(), utcnow(), held=self.held(),
                                                           grace_seconds=grace):
                        self._end_later(boost.id, reason)
                    if time.monotonic() - last_resync > RESYNC_SECONDS:
                        last_resync = time.monotonic()
                        self.resync(self.store())
                    if time.monotonic() - last_lender_check > LENDER_CHECK_SECONDS:
                        last_lender_check = time.monotonic()
                        self._check_lenders()
                except Exception as exc:  # the timer must outlive any one failure
                    logger.warning("boost controller timer: %s: %s", type(exc).__name__, exc)
                    time.sleep(MAX_SLEEP_SECONDS)

    def _check_lenders(self) -> None:
        """Reconcile (the one judge of lost boosts) when Ray marks a live boost's lender dead."""
        from grid_flows.adapters.ray import cluster as rc
        from grid_flows.control import boosts
        from grid_flows.core.models import BoostState

        sources = {b.source for b in self.memory.snapshot() if b.state is BoostState.active}
        if not sources:
            return
        alive = {name: info.alive for name, info in rc.grid_nodes().items()}
        down = sorted(s for s in sources if not alive.get(s, False))
        if down:
            logger.info("lender(s) %s down: reconciling now", ", ".join(down))
            boosts.reconcile()  # one pass at a time: it takes self.reconciling

    def grace_seconds(self) -> float:
        try:
            return self.spec(self.store()).resource_sharing.grace_seconds
        except GridError:
            return 0.0

    def held(self) -> frozenset[str]:
        with self.memory.cond:
            return frozenset(self.memory.held)

    def hold(self, boost_id: str, held: bool) -> None:
        with self.memory.cond:
            if held:
                self.memory.held.add(boost_id)
            else:
                self.memory.held.discard(boost_id)
            self.memory.cond.notify_all()  # the timer recomputes its next deadline

    def _end_later(self, boost_id: str, reason: str) -> None:
        """End a due boost in a pool thread (its group removal waits for Ray), once."""
        with self.memory.cond:
            if boost_id in self._ending:
                return
            self._ending.add(boost_id)
        self._enders.submit(self._end_due, boost_id, reason)

    def _end_due(self, boost_id: str, reason: str) -> None:
        from grid_flows.control import boosts

        try:
            with self._context():
                boosts.end(self.store(), boost_id, ledger.Event.expire, reason)
        except Exception as exc:
            logger.warning("could not end boost %s at its deadline (trying again in 1 s): %s", boost_id, exc)
            time.sleep(MAX_SLEEP_SECONDS)  # in this pool thread: the timer retries after it, not in a loop
        finally:
            with self.memory.cond:
                self._ending.discard(boost_id)
