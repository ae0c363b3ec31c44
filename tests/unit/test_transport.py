"""GridTransport: which requests are writes, quick resends of a 503, one write at a time."""

from __future__ import annotations

import threading

import httpx
import pytest

from grid_flows.adapters.prefect import transport
from grid_flows.adapters.prefect.transport import GridTransport, is_write


@pytest.mark.parametrize("method, path, write", [
    ("POST", "/api/block_documents/", True),
    ("PATCH", "/api/block_documents/1", True),
    ("DELETE", "/api/block_documents/1", True),
    ("PUT", "/api/x", True),
    ("POST", "/api/block_documents/filter", False),
    ("POST", "/api/block_types/slug/grid-boost/block_documents/filter/", False),
    ("POST", "/api/flow_runs/count", False),
    ("POST", "/api/flow_runs/paginate", False),
    ("GET", "/api/block_documents/1", False),
])
def test_is_write(method, path, write):
    assert is_write(httpx.Request(method, f"http://server{path}")) is write


def _answers(*codes: int, seen: list | None = None) -> httpx.MockTransport:
    left = list(codes)

    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request.content)
        return httpx.Response(left.pop(0) if left else 200)

    return httpx.MockTransport(answer)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(transport.time, "sleep", lambda seconds: None)


def test_a_503_write_is_resent_with_its_body():
    seen: list = []
    with httpx.Client(transport=GridTransport(_answers(503, 503, seen=seen))) as client:
        assert client.post("http://server/api/block_documents/", json={"a": 1}).status_code == 200
    assert seen == [b'{"a":1}'] * 3


def test_after_the_quick_resends_the_503_goes_back_to_the_caller():
    codes = [503] * (len(transport.RESEND_DELAYS_SECONDS) + 1)
    with httpx.Client(transport=GridTransport(_answers(*codes, 200))) as client:
        assert client.delete("http://server/api/block_documents/1").status_code == 503


def test_reads_and_other_errors_are_not_resent():
    seen: list = []
    with httpx.Client(transport=GridTransport(_answers(503, 500, seen=seen))) as client:
        assert client.post("http://server/api/block_documents/filter").status_code == 503
        assert client.post("http://server/api/block_documents/").status_code == 500
    assert len(seen) == 2


def test_one_write_at_a_time_per_process():
    inside, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(0.05)  # let the other threads try to come in meanwhile
        with lock:
            inside[0] -= 1
        return httpx.Response(200)

    clients = [httpx.Client(transport=GridTransport(httpx.MockTransport(answer))) for _ in range(4)]
    threads = [threading.Thread(target=c.post, args=("http://server/api/block_documents/",)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert most[0] == 1
