"""Flow parameters are typed, so the Prefect UI's run form offers the choices and checks the ranges."""

from __future__ import annotations

from grid_flows.core.models import Priority
from grid_flows.core.placement import Strategy
from grid_flows.flows.lifecycle import reconcile_boosts, request_boost_flow
from grid_flows.flows.offload import USE_BOOST, offload


def schema(flow) -> dict:
    return flow.parameters.model_dump()


def choices(flow, name: str) -> list:
    s = schema(flow)
    prop = s["properties"][name]
    if "$ref" in prop:
        prop = s["definitions"][prop["$ref"].rsplit("/", 1)[1]]
    return prop["enum"]


def test_request_form_offers_the_priorities_and_refuses_negative_amounts():
    s = schema(request_boost_flow)
    assert choices(request_boost_flow, "priority") == [p.value for p in Priority]
    assert s["properties"]["cpu"]["minimum"] == 0 and s["properties"]["gpu"]["minimum"] == 0
    assert s["required"] == ["target"]
    assert "CPUs to borrow" in s["properties"]["cpu"].get("description", "")  # from the docstring's Args


def test_offload_form_offers_priorities_strategies_and_boost_choices():
    assert choices(offload, "priority") == [p.value for p in Priority]
    assert choices(offload, "strategy") == [s.value for s in Strategy]
    assert choices(offload, "use_boost") == list(USE_BOOST) == ["auto", "always", "never"]
    props = schema(offload)["properties"]
    assert props["cpu"]["minimum"] == 0 and props["timeout_seconds"]["anyOf"][0]["exclusiveMinimum"] == 0


def test_reconcile_form_refuses_a_negative_pending_timeout():
    props = schema(reconcile_boosts)["properties"]
    assert props["pending_timeout_seconds"].get("minimum", props["pending_timeout_seconds"].get("exclusiveMinimum")) == 0
