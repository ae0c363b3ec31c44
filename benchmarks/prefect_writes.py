"""Prefect writes under contention: Prefect's own client against grid-flows' GridTransport.

4 threads loop creating and deleting a block document, and one thread writes a table
artifact every 50 ms (as the controller's publisher does), for 30 s each way, against
one local Prefect server (SQLite). Baseline: the same load through Prefect's client as it
comes (a 503 waits 2, 4, 8 ... s), measured in the same run.

    .venv/bin/python -m benchmarks.prefect_writes
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Result, quiet_environment  # noqa: E402

quiet_environment()
WRITERS = 4
SECONDS = 30.0


def _load(make_client, seconds: float) -> tuple[int, list[float]]:
    from prefect.client.schemas.actions import ArtifactCreate, BlockDocumentCreate

    with make_client() as client:
        warm = client.read_block_document_by_name("bench-writes", "secret")
    stop = time.time() + seconds
    cycles: list[float] = []
    lock = threading.Lock()

    def writer() -> None:
        with make_client() as client:
            while time.time() < stop:
                t0 = time.perf_counter()
                doc = client.create_block_document(BlockDocumentCreate(
                    name=f"bench-{uuid.uuid4().hex[:20]}", data={"value": "x"},
                    block_schema_id=warm.block_schema_id, block_type_id=warm.block_type_id))
                client.delete_block_document(doc.id)
                with lock:
                    cycles.append(time.perf_counter() - t0)

    def artifacts() -> None:
        with make_client() as client:
            while time.time() < stop:
                client.create_artifact(ArtifactCreate(key="bench-writes", type="table", data="[]"))
                time.sleep(0.05)  # the publisher's pace under load

    threads = [threading.Thread(target=writer) for _ in range(WRITERS)] + [threading.Thread(target=artifacts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    return len(cycles), sorted(cycles)


def prefect_writes(seconds: float = SECONDS) -> Result:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from grid_flows.adapters.prefect.store import api_client

    Secret(value="x").save("bench-writes", overwrite=True)
    base_n, base = _load(lambda: get_client(sync_client=True), seconds)
    ours_n, ours = _load(api_client, seconds)

    def line(n: int, cycles: list[float]) -> str:
        return (f"{n / seconds:.1f} create+delete/s, p50 {cycles[len(cycles) // 2] * 1000:.0f} ms, "
                f"max {cycles[-1]:.2f} s" if cycles else "no cycle finished")

    ratio = (ours_n / base_n) if base_n else float("inf")
    return Result(
        name=f"Prefect writes: {WRITERS} threads create+delete a block, 1 writes artifacts, {seconds:.0f} s",
        measured=f"GridTransport: {line(ours_n, ours)}",
        baseline=f"Prefect's client: {line(base_n, base)}",
        ratio=f"{ratio:.1f}x",
        goal=">= 2x the writes, slowest cycle < 2 s",
        passed=ratio >= 2 and bool(ours) and ours[-1] < 2.0,
        note="SQLite answers 503 when two writes meet; Prefect's client waits 2**n s before resending",
    )


def main() -> int:
    from grid_flows.dev.local_prefect import local_prefect_server

    home = tempfile.mkdtemp(prefix="grid-bench-writes-")
    os.environ["PREFECT_HOME"] = home
    with local_prefect_server(home=home) as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        result = prefect_writes()
    print(f"{result.name}\n  {result.measured}\n  {result.baseline}\n  {result.ratio} ({result.goal}): {result.verdict}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
