"""`grid ... --help` reads like Prefect's own CLI: no `<bool>`/`<str>` type labels."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from grid_flows.cli.app import app


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            paths += _command_paths(sub, (*path, name))
    return paths


PATHS = _command_paths(typer.main.get_command(app))


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "grid" for p in PATHS])
def test_help_shows_no_type_labels(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "<str>" not in result.output and "<float>" not in result.output


def test_every_command_is_reached():
    assert ("boost", "status") in PATHS and ("node", "ray-args") in PATHS and len(PATHS) > 10
