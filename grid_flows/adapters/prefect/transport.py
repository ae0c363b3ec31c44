"""The httpx transport of grid-flows' Prefect clients: one write at a time per process, and a
503 answer resent within milliseconds.

A Prefect server on SQLite has one writer at a time. When two writes meet, one of them is
rolled back and answered 503 ("database is locked"); it can simply be sent again, but
Prefect's client waits 2, 4, 8 ... s before it does (a backoff meant for a busy Cloud
API). Under the boost controller's lock such a wait stalls every requester. So this
transport:

- sends the writes of one process one at a time (reads, including the ``/filter`` and
  ``/count`` POSTs, are not held back), so the controller's threads do not collide with
  each other;
- resends a 503 after 10, 40, 160 and 640 ms; a 503 after that goes back to Prefect's own
  retries.

Measured by ``benchmarks/prefect_writes.py`` (4 writer threads and an artifact writer against
one local server, 30 s, on the 2-core machine): 0.7 block create+delete cycles a second with
Prefect's client (slowest 33.6 s), 21.3 with this transport (slowest 0.64 s).

Example:
    ```python
    import httpx
    from grid_flows.adapters.prefect.transport import GridTransport
    client = httpx.Client(transport=GridTransport(httpx.HTTPTransport()), base_url="http://127.0.0.1:4200/api")
    ```
"""

from __future__ import annotations

import threading
import time

import httpx

RESEND_DELAYS_SECONDS = (0.01, 0.04, 0.16, 0.64)
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_READ_SUFFIXES = ("/filter", "/count", "/paginate")  # POSTs that only read
_one_writer = threading.Lock()  # per process, shared by every client


def is_write(request: httpx.Request) -> bool:
    return request.method in _WRITES and not request.url.path.rstrip("/").endswith(_READ_SUFFIXES)


class GridTransport(httpx.BaseTransport):
    """Sends through ``inner`` (an ``httpx.HTTPTransport``), one write at a time per process,
    resending a 503 quickly."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not is_write(request):
            return self.inner.handle_request(request)
        request.read()  # the body may be sent again: keep it in memory
        with _one_writer:
            for delay in RESEND_DELAYS_SECONDS:
                response = self.inner.handle_request(request)
                if response.status_code != 503:
                    return response
                response.close()
                time.sleep(delay)
            return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
