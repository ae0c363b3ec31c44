"""The controller's in-memory records and change log (no Ray, no server: Memory does no I/O)."""

from __future__ import annotations

from grid_flows.control.controller import Memory
from grid_flows.core.models import BoostState

from tests.factories import in_state, pending

S = BoostState


def test_a_claim_is_live_but_no_watcher_hears_of_it_until_it_is_written():
    memory = Memory()
    memory.put(pending("c1"), durable=False)
    assert [b.id for b in memory.snapshot()] == ["c1"] and memory.durable == set()
    assert memory.changes_since(0) == (0, [], True)
    memory.put(in_state(S.active, "c1"), durable=True)
    version, changed, complete = memory.changes_since(0)
    assert (version, [b.state for b in changed], complete) == (1, [S.active], True)


def test_a_claim_that_is_dropped_leaves_nothing():
    memory = Memory()
    memory.put(pending("c1"), durable=False)
    memory.drop_claim("c1")
    assert memory.snapshot() == [] and memory.version == 0


def test_an_ended_boost_leaves_the_live_set_and_is_reported():
    memory = Memory()
    memory.put(in_state(S.active, "a"), durable=True)
    memory.held.add("a")
    memory.put(in_state(S.released, "a"), durable=True)
    assert memory.snapshot() == [] and memory.held == set() and memory.durable == set()
    assert [b.state for b in memory.changes_since(1)[1]] == [S.released]


def test_a_resync_takes_prefects_records_and_keeps_claims_in_flight():
    memory = Memory()
    memory.put(in_state(S.active, "kept"), durable=True)
    memory.put(in_state(S.active, "gone"), durable=True)  # ended by a process with the controller off
    memory.put(pending("claim"), durable=False)
    before = memory.version
    memory.replace_durable([in_state(S.active, "kept"), in_state(S.active, "new")], read_since=before)
    assert sorted(b.id for b in memory.snapshot()) == ["claim", "kept", "new"]
    assert memory.durable == {"kept", "new"}
    version, changed, complete = memory.changes_since(before)
    assert not complete and sorted(b.id for b in changed) == ["claim", "kept", "new"]  # a watcher re-reads all


def test_a_resync_keeps_what_changed_here_while_it_read():
    memory = Memory()
    memory.put(in_state(S.active, "ended-here"), durable=True)
    read_since = memory.version  # the read of Prefect's records begins
    memory.put(in_state(S.active, "granted-here"), durable=True)  # written during the read: not in it
    memory.put(in_state(S.released, "ended-here"), durable=True)  # the read still saw it live
    memory.replace_durable([in_state(S.active, "ended-here")], read_since=read_since)
    assert sorted(b.id for b in memory.snapshot()) == ["granted-here"]
    assert memory.durable == {"granted-here"}


def test_a_watcher_further_behind_than_the_log_gets_the_whole_live_set():
    memory = Memory()
    for i in range(memory.log.maxlen + 5):
        memory.put(in_state(S.active, f"b{i}"), durable=True)
    version, changed, complete = memory.changes_since(2)
    assert not complete and len(changed) == memory.log.maxlen + 5
    version, changed, complete = memory.changes_since(version - 3)
    assert complete and len(changed) == 3
