"""Run the `grid` command in the test process (same Prefect server and Ray cluster)."""

from __future__ import annotations

import sys

import pytest


def grid_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`grid ARGS` through the real entry point; returns exit code, stdout and stderr."""
    from grid_flows.cli.app import main

    argv = sys.argv
    sys.argv = ["grid", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, without_logging_errors(captured.err)


def without_logging_errors(text: str) -> str:
    """Drop `--- Logging error ---` reports: Prefect's console handler keeps the stderr of
    the first test that logged (pytest's capture, closed since) and reports each write to
    it. That is a test-harness artefact, not output of the command under test."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("--- Logging error ---"):
            skipping = True
        elif skipping and line.startswith("Arguments: "):
            skipping = False
            continue
        if not skipping:
            kept.append(line)
    return "".join(kept)
