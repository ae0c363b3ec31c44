"""Every error lives in grid_flows.errors; the CLI alone decides the exit code of each."""

from __future__ import annotations

import inspect

import pytest

from grid_flows import errors
from grid_flows.cli.app import EXIT_UNREACHABLE, exit_code_for


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.GridError("x"), 1),
        (errors.InvalidRequest("x"), 2),
        (errors.UnknownBoost("x"), 2),
        (errors.UnknownNode("x"), 2),
        (errors.BoostsDisabled("x"), 2),
        (errors.InvalidClusterFile("x"), 2),
        (errors.IllegalTransition("x"), 2),
        (errors.ClusterNotConfigured("x"), 2),
        (errors.NoCapacity("x"), 3),
        (errors.GpuUnavailable("x"), 3),
        (errors.VramCapExceeded("x"), 3),
        (errors.RayUnavailable("x"), EXIT_UNREACHABLE),
        (errors.ControllerUnavailable("x"), EXIT_UNREACHABLE),
        (errors.LedgerBusy("x"), 1),
        (errors.ThrottleError("x"), 1),
        (errors.GpuProbeError("x"), 1),
        (errors.InvariantViolation("x"), 1),
        (errors.OffloadFailed("killed", 137), 137),
    ],
)
def test_exit_code_of_each_error(error, code):
    assert exit_code_for(error) == code


def test_every_error_class_is_a_grid_error_defined_in_errors_and_has_no_exit_code():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) == 19
    for cls in classes:
        assert issubclass(cls, errors.GridError)
        assert not hasattr(cls, "exit_code"), f"{cls.__name__}: exit codes belong to the CLI"


def test_user_input_errors_are_value_errors():
    for cls in (errors.InvalidRequest, errors.InvalidClusterFile, errors.UnknownBoost, errors.BoostsDisabled):
        assert issubclass(cls, ValueError)


def test_offload_failed_keeps_its_code_through_pickling():
    import pickle

    again = pickle.loads(pickle.dumps(errors.OffloadFailed("timed out", 124)))
    assert (str(again), again.code) == ("timed out", 124)
