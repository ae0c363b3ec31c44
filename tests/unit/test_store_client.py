"""store.api_client: one TLS context per process, chosen as Prefect's client chooses it, under GridTransport."""

from __future__ import annotations

import ssl

import pytest
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, PREFECT_API_URL, temporary_settings

from grid_flows.adapters.prefect.store import api_client
from grid_flows.adapters.prefect.transport import GridTransport

pytestmark = pytest.mark.timeout(60)


def _verify(client) -> ssl.SSLContext:
    transport = client._client._transport
    assert isinstance(transport, GridTransport)  # writes one at a time, a 503 resent quickly
    return transport.inner._pool._ssl_context


def test_clients_share_one_verifying_context_by_default():
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        first, second = api_client(), api_client()
    assert first is not second
    assert _verify(first) is _verify(second)
    assert _verify(first).verify_mode is ssl.CERT_REQUIRED


def test_skip_verify_is_honoured_as_prefect_honours_it():
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        context = _verify(api_client())
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname
