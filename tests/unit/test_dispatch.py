"""The runner's dispatch decisions, without Ray or Prefect: events in, instructions out."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from grid_flows.core.dispatch import BoostUse, Cancel, Dispatch, Dispatcher, Fail, Finish, Rerun, Say, Task
from grid_flows.core.models import Resources
from grid_flows.core.placement import PlacementKind, Requirement
from tests.factories import T0

HEAD, LENDER = "head", "gpu1"


def cpu(n: float) -> Resources:
    return Resources(cpu=n)


def dispatcher(head: float = 2, lender: float | None = None, *, offload: bool = False, **kw) -> Dispatcher:
    budget = {HEAD: cpu(head)} | ({LENDER: cpu(lender)} if lender is not None else {})
    return Dispatcher(HEAD, budget, {name: True for name in budget}, allow_offload=offload, **kw)


def task(key: int, cpus: float = 1, *, priority: int = 0, upstream: tuple = (), node: str | None = None) -> Task:
    return Task((priority, key), key, Requirement(cpu(cpus), node), upstream, f"t{key}")


def kinds(instructions) -> list[tuple]:
    """Instructions as comparable tuples: (name, key, where) / (name, keys) / (name, text)."""
    out = []
    for i in instructions:
        if isinstance(i, Dispatch):
            out.append(("dispatch", i.key, i.placement.kind.value, i.placement.node))
        elif isinstance(i, (Finish, Fail)):
            out.append((type(i).__name__.lower(), i.key))
        elif isinstance(i, Rerun):
            out.append(("rerun", i.key, i.node))
        elif isinstance(i, Cancel):
            out.append(("cancel", i.keys))
        elif isinstance(i, Say):
            out.append(("say", i.message.split(";")[0]))
    return out


def run(d: Dispatcher, *tasks: Task, now=T0) -> list[tuple]:
    for t in tasks:
        d.submit(t)
    return kinds(d.dispatch_ready(now))


@pytest.mark.parametrize(
    ("head", "tasks", "expected"),
    [
        # what fits goes, in priority order (the smaller sort key first), the rest waits
        (2, [task(1), task(2), task(3)], [("dispatch", 1, "target", HEAD), ("dispatch", 2, "target", HEAD)]),
        (1, [task(1, priority=0), task(2, priority=-3)], [("dispatch", 2, "target", HEAD)]),
        # a big task that does not fit does not block a small one behind it
        (2, [task(1, 4), task(2, 1)], [("dispatch", 2, "target", HEAD)]),
        # nothing fits: nothing is dispatched and the queue keeps both
        (0.5, [task(1), task(2)], []),
    ],
)
def test_a_pass_dispatches_what_fits_in_priority_order(head, tasks, expected):
    d = dispatcher(head)
    assert run(d, *tasks) == expected
    assert len(d.queue) == len(tasks) - len(expected)


def test_a_task_waits_for_its_upstream_to_finish():
    d = dispatcher(4)
    assert run(d, task(1), task(2, upstream=(1,))) == [("dispatch", 1, "target", HEAD)]
    assert kinds(d.task_done(1)) == [("finish", 1)]
    assert run(d) == [("dispatch", 2, "target", HEAD)]


def test_capacity_comes_back_when_a_task_ends_and_the_next_one_goes():
    d = dispatcher(1)
    assert run(d, task(1), task(2)) == [("dispatch", 1, "target", HEAD)]
    assert d.nodes[HEAD].free == cpu(0)
    d.task_done(1)
    assert d.nodes[HEAD].free == cpu(1)
    assert run(d) == [("dispatch", 2, "target", HEAD)]
    assert d.idle is False
    d.task_done(2)
    assert d.idle


def test_a_refused_submission_fails_that_task_and_gives_its_capacity_back():
    d = dispatcher(1)
    run(d, task(1), task(2))
    error = ValueError("bad option")
    assert d.dispatch_failed(1, error) == [Fail(1, error, "could not submit")]
    assert 1 in d.finished and d.nodes[HEAD].free == cpu(1)
    assert run(d) == [("dispatch", 2, "target", HEAD)]


def test_a_full_target_offloads_within_a_lenders_share_when_offload_is_on():
    d = dispatcher(1, lender=2, offload=True)
    assert run(d, task(1), task(2), task(3), task(4)) == [
        ("dispatch", 1, "target", HEAD), ("dispatch", 2, "offload", LENDER), ("dispatch", 3, "offload", LENDER)]
    assert d.nodes[LENDER].lendable_free == cpu(0)


def test_a_boost_on_a_node_the_runner_does_not_see_alive_takes_nothing():
    d = dispatcher(0)
    d.attach(BoostUse("b1", LENDER, cpu(2), T0 + timedelta(minutes=5)))
    assert run(d, task(1)) == []


def test_the_flows_boost_takes_what_the_target_cannot():
    d = dispatcher(1, lender=0)  # a boost's source must be a node the runner sees alive
    d.attach(BoostUse("b1", LENDER, cpu(2), T0 + timedelta(minutes=5)))
    assert run(d, task(1), task(2), task(3), task(4)) == [
        ("dispatch", 1, "target", HEAD), ("dispatch", 2, "boost", LENDER), ("dispatch", 3, "boost", LENDER)]
    assert (d.boosts["b1"].count, d.boosts["b1"].in_flight) == (2, cpu(2))
    d.task_done(2)
    assert (d.boosts["b1"].count, d.boosts["b1"].in_flight) == (1, cpu(1))


def test_a_boost_past_its_end_takes_no_new_task_and_says_so_once():
    d = dispatcher(0, lender=0)
    d.attach(BoostUse("b1", LENDER, cpu(2), T0))
    assert run(d, task(1), now=T0) == [("say", "Boost b1 expired at 12:00:00 UTC")]
    assert d.boosts["b1"].why_unusable == "expired"
    assert run(d, now=T0) == []
    # extended: it takes tasks again
    assert d.resume_routing("b1", expires_at=T0 + timedelta(minutes=1), now=T0, only_if="expired")
    assert run(d, now=T0) == [("dispatch", 1, "boost", LENDER)]


@pytest.mark.parametrize(
    ("why", "only_if", "resumes"),
    [
        ("it is being preempted by boost abc", "it is being preempted by boost", True),
        ("lender gpu1 is down", "it is being preempted by boost", False),
        ("expired", "expired", True),
    ],
)
def test_routing_resumes_only_for_the_reason_that_stopped_it(why, only_if, resumes):
    d = dispatcher(0)
    d.attach(BoostUse("b1", LENDER, cpu(1), T0 + timedelta(minutes=5)))
    assert kinds(d.stop_routing("b1", why)) == [("say", f"Boost b1: {why}")]
    assert d.stop_routing("b1", why) == []  # said once
    assert d.resume_routing("b1", only_if=only_if) is resumes
    assert d.boosts["b1"].usable is resumes


def test_a_task_lost_with_its_lender_runs_once_more_elsewhere_then_its_end_is_final():
    d = dispatcher(0, lender=1, offload=True)
    assert run(d, task(1)) == [("dispatch", 1, "offload", LENDER)]
    out = kinds(d.task_done(1, lost_with_node=True, error="NodeDiedError"))
    assert out == [("rerun", 1, LENDER), ("say", "Task t1 was lost with gpu1 (NodeDiedError)")]
    assert d.alive[LENDER] is False and d.queue[0].attempts == 1
    d.node_up(LENDER)
    assert run(d) == [("dispatch", 1, "offload", LENDER)]
    assert kinds(d.task_done(1, lost_with_node=True)) == [("finish", 1)]  # one re-run only


def test_a_task_lost_on_the_target_is_not_run_again():
    d = dispatcher(1)
    run(d, task(1))
    assert kinds(d.task_done(1, lost_with_node=True)) == [("finish", 1)]


def test_a_dead_node_gets_no_task_and_its_unreported_tasks_are_cancelled_once():
    d = dispatcher(0, lender=2, offload=True)
    run(d, task(1), task(2))
    assert kinds(d.node_died(LENDER)) == [("cancel", (1, 2))]
    assert d.node_died(LENDER) == []  # already stranded
    # a cancelled stranded task comes back as lost and is queued again, but not on the dead node
    assert kinds(d.task_done(1, cancelled=True))[0] == ("rerun", 1, LENDER)
    assert run(d) == []


def test_a_cancelled_task_that_was_not_stranded_just_ends():
    d = dispatcher(0, lender=1, offload=True)
    run(d, task(1))
    assert kinds(d.task_done(1, cancelled=True)) == [("finish", 1)]


def test_a_removed_group_strands_the_tasks_in_that_boost():
    d = dispatcher(1, lender=0)
    d.attach(BoostUse("b1", LENDER, cpu(2), T0 + timedelta(minutes=5)))
    run(d, task(1), task(2), task(3))
    assert kinds(d.strand_boost("b1")) == [("cancel", (2, 3))]
    out = kinds(d.task_done(2, cancelled=True))
    assert out[0] == ("rerun", 2, LENDER) and d.boosts["b1"].usable is False


def test_a_busy_target_sends_work_to_lent_capacity_first():
    d = dispatcher(2, lender=2, offload=True)
    d.target_busy = "cpu 95% for 5 min"
    assert run(d, task(1)) == [("dispatch", 1, "offload", LENDER)]


def test_a_placement_error_fails_that_task_alone(monkeypatch):
    import grid_flows.core.dispatch as dispatch

    calls = []

    def place(requirement, *args, **kw):
        calls.append(requirement)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real_place(requirement, *args, **kw)

    real_place = dispatch.place
    monkeypatch.setattr(dispatch, "place", place)
    d = dispatcher(2)
    assert run(d, task(1), task(2, 2)) == [("fail", 1), ("dispatch", 2, "target", HEAD)]
    assert 1 in d.finished


def test_a_long_queue_of_like_tasks_is_placed_once_per_requirement(monkeypatch):
    import grid_flows.core.dispatch as dispatch

    calls = []
    real_place = dispatch.place
    monkeypatch.setattr(dispatch, "place", lambda r, *a, **k: calls.append(r) or real_place(r, *a, **k))
    d = dispatcher(1)
    run(d, *[task(k) for k in range(50)])
    assert len(calls) == 2  # one that fits, one that finds no room for all the others


def test_saying_is_a_log_level_and_a_line():
    d = dispatcher(0)
    d.attach(BoostUse("b1", LENDER, cpu(1), T0))
    (say,) = [i for i in d.dispatch_ready(T0) if isinstance(i, Say)] or [None]
    assert say is None  # an empty queue is not even looked at
    d.submit(task(1))
    (say,) = d.dispatch_ready(T0)
    assert say.level == logging.WARNING


def test_placement_kinds_match_the_flights():
    d = dispatcher(1, lender=1, offload=True)
    run(d, task(1), task(2))
    assert {k: f.kind for k, f in d.in_flight.items()} == {1: PlacementKind.target, 2: PlacementKind.offload}


def test_load_balanced_offloads_to_the_calmer_lender_once_it_knows_the_pressure():
    from grid_flows.core.placement import Pressure

    def fresh() -> Dispatcher:
        return Dispatcher(HEAD, {HEAD: cpu(0), "gpu1": cpu(2), "gpu2": cpu(2)}, {HEAD: True, "gpu1": True, "gpu2": True},
                          strategy="load_balanced", allow_offload=True)

    blind = fresh()
    assert run(blind, task(1)) == [("dispatch", 1, "offload", "gpu1")]  # all calm: the first in order
    seeing = fresh()
    seeing.set_pressures({"gpu1": Pressure(cpu=0.95, memory=0.4, has_gpu=False), "gpu2": Pressure(cpu=0.1)})
    assert run(seeing, task(1)) == [("dispatch", 1, "offload", "gpu2")]
    assert seeing.nodes["gpu1"].pressure.score == pytest.approx(0.675)
    seeing.set_pressures({})  # stale history: every node reads as calm again
    assert seeing.nodes["gpu1"].pressure.score == 0
