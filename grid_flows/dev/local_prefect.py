"""Start and stop a local Prefect server as a child process (for the demo and scripts).

Example:
    ```python
    from grid_flows.dev.local_prefect import local_prefect_server
    with local_prefect_server(home=".demo/prefect") as api_url:
        print(api_url)          # http://127.0.0.1:<port>/api; PREFECT_API_URL points here
    ```
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from grid_flows.errors import GridError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout_seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise GridError(f"the Prefect server exited early with code {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise GridError(f"the Prefect server at {api_url} was not healthy after {timeout_seconds:g} s")


@contextlib.contextmanager
def local_prefect_server(
    home: str | Path, port: int | None = None, timeout_seconds: float = 90, log_file: str | Path | None = None
) -> Iterator[str]:
    """Run ``prefect server start`` on loopback with its own PREFECT_HOME (SQLite unless
    PREFECT_API_DATABASE_CONNECTION_URL is set); yield the API URL.

    ``PREFECT_API_URL`` is set for this process and its children while the context is
    open. The server's process group is stopped on exit.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # its telemetry job locks SQLite
        "PREFECT_API_URL": api_url,
    }
    log = open(log_file or home / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so we can stop all of it
    )
    saved = os.environ.get("PREFECT_API_URL")
    try:
        wait_healthy(api_url, timeout_seconds, proc)
        os.environ["PREFECT_API_URL"] = api_url  # for child processes
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):  # for this process
            yield api_url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, timeout_seconds: float = 15) -> None:
    """Stop ``proc`` and everything it started: SIGTERM, then SIGKILL after ``timeout_seconds``."""
    from grid_flows.adapters.host.processes import ProcessTree

    if proc.poll() is None:
        ProcessTree().track(proc.pid).kill(timeout_seconds, child=proc)
    proc.wait(timeout=5)
