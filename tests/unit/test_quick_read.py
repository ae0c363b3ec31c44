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


def test_the_cluster_name_comes_from_the_environment_or_is_left_to_prefects_settings(tmp_path):
    from grid_flows.adapters.prefect.quick_read import cluster_from_environment

    home = {"PREFECT_HOME": str(tmp_path / "home")}
    assert cluster_from_environment(home, cwd=tmp_path) == "default"
    assert cluster_from_environment({**home, "PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK": "lab"}, cwd=tmp_path) == "lab"
    # What pydantic's settings would read differently (spaces, another case): left to them.
    assert cluster_from_environment({**home, "PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK": " lab "}, cwd=tmp_path) is None
    assert cluster_from_environment({**home, "prefect_integrations_grid_cluster_block": "lab"}, cwd=tmp_path) is None
    (tmp_path / "prefect.toml").write_text('[integrations.grid]\ncluster_block = "lab"\n')
    assert cluster_from_environment(home, cwd=tmp_path) is None  # only Prefect's settings read the file
    (tmp_path / "prefect.toml").unlink()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text('[profiles.x]\nPREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK = "lab"\n')
    assert cluster_from_environment(home, cwd=tmp_path) is None


def test_records_are_read_for_one_cluster_only():
    from grid_flows.adapters.prefect.records import in_cluster

    assert in_cluster({"cluster": "lab"}, "lab") and not in_cluster({"cluster": "lab"}, "default")
    assert in_cluster({}, "default")  # written before clusters were named
