"""Which environments the plain-HTTP status read answers for, and with what auth (quick_read)."""

from __future__ import annotations

import pytest

from grid_flows.adapters.prefect.quick_read import api_from_environment, read_boosts

URL = "http://127.0.0.1:4200/api"

CASES = [
    ({}, None),  # no URL in the environment: profiles or prefect.toml may name one; Prefect resolves it
    ({"PREFECT_API_URL": ""}, None),
    ({"PREFECT_API_URL": "ws://127.0.0.1:4200/api"}, None),
    ({"PREFECT_API_URL": URL + "/"}, (URL, None)),
    ({"PREFECT_API_URL": URL, "PREFECT_API_KEY": "pnu_x"}, (URL, "Bearer pnu_x")),
    ({"PREFECT_API_URL": URL, "PREFECT_API_AUTH_STRING": "admin:pass"}, (URL, "Basic YWRtaW46cGFzcw==")),
    ({"PREFECT_API_URL": URL, "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "true"}, None),
    ({"PREFECT_API_URL": URL, "PREFECT_API_SSL_CERT_FILE": "/etc/ca.pem"}, None),
    ({"PREFECT_API_URL": URL, "PREFECT_CLIENT_CUSTOM_HEADERS": '{"X-A": "b"}'}, None),
]


@pytest.mark.parametrize("env,expected", CASES, ids=[str(sorted(env)) for env, _ in CASES])
def test_api_from_environment(env, expected):
    api = api_from_environment(env)
    if expected is None:
        assert api is None
    else:
        url, headers = api
        assert (url, headers.get("Authorization")) == expected


def test_an_unreachable_api_leaves_the_read_to_prefects_client():
    assert read_boosts(env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}) is None  # port 9: discard, refused
