"""`make peer`: prefect-ray's own test suite against BoostRayTaskRunner, beside RayTaskRunner.

    .venv/bin/python scripts/peer.py [--only ray|grid|labelled ...] [-- PYTEST_ARGS]

Fetches the source package of the installed prefect-ray version with pip into a temporary
folder and runs its unmodified ``tests/`` three times, each in its own pytest process:

1. ``ray``: with prefect-ray's ``RayTaskRunner`` (the baseline, same session);
2. ``grid``: ``RayTaskRunner`` replaced by ``BoostRayTaskRunner`` (plugin ``scripts/peer/grid_peer.py``),
   no GridCluster block;
3. ``labelled``: the same, with ``grid.node`` labels on the Ray nodes the tests start and a
   matching GridCluster block on the tests' Prefect server.

Prints each run's counts and every test whose outcome differs from the baseline, and exits
non-zero when a test that passes with RayTaskRunner does not pass in a grid run. Needs no
other Ray on this machine: prefect-ray's existing-cluster fixture runs ``ray stop --force``,
which stops every Ray process of this user.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "ray": ("prefect-ray RayTaskRunner (baseline)", ["--grid-runner=ray"]),
    "grid": ("BoostRayTaskRunner, no GridCluster block", ["--grid-runner=grid", "--grid-cluster=none"]),
    "labelled": ("BoostRayTaskRunner, grid.node labels and a GridCluster block",
                 ["--grid-runner=grid", "--grid-cluster=labelled"]),
}
PLUGINS = {"pytest_asyncio": "pytest-asyncio>=0.25.3", "pytest_env": "pytest-env", "pytest_timeout": "pytest-timeout"}
TEST_TIMEOUT_SECONDS = 600  # per test; a hung test fails instead of stopping the run
RUN_TIMEOUT_SECONDS = 3600


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def ensure_plugins() -> None:
    """prefect-ray's test settings (asyncio mode, env) need these pytest plugins."""
    import importlib.util

    missing = [spec for module, spec in PLUGINS.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing {', '.join(missing)} ...", flush=True)
        pip("install", *missing)


def fetch_tests(into: Path) -> Path:
    """The sdist of the installed prefect-ray, unpacked; returns its folder (holds ``tests/``)."""
    pinned = version("prefect-ray")
    print(f"fetching the prefect-ray {pinned} source package ...", flush=True)
    pip("download", f"prefect-ray=={pinned}", "--no-binary", ":all:", "--no-deps", "-d", str(into))
    (archive,) = into.glob("prefect_ray-*.tar.gz")
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python before 3.10.12 has no extraction filters
            tar.extractall(into)
    source = into / archive.name.removesuffix(".tar.gz")
    if not (source / "tests").is_dir():
        raise SystemExit(f"no tests/ in {archive.name}")
    return source


def run(source: Path, name: str, extra: list[str], workdir: Path) -> dict[str, tuple[str, float]]:
    """One pytest run of prefect-ray's tests; {test id: (outcome, seconds)}."""
    label, options = RUNS[name]
    junit = workdir / f"{name}.xml"
    env = {**os.environ,
           # the plugin; and prefect-ray's folder, so Ray workers can import the tests' module
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE / "peer"), str(source), os.environ.get("PYTHONPATH")])),
           # the existing-cluster fixture calls the `ray` command
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # the same for `ray start` and every client: no token
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pytest", "tests", "-p", "grid_peer", *options, "-p", "no:cacheprovider",
               f"--junitxml={junit}", f"--timeout={TEST_TIMEOUT_SECONDS}", "-q", "-rfE", *extra]
    print(f"\n== {label}\n$ {' '.join(command)}", flush=True)
    started = time.monotonic()
    # Its own process group: what the run leaves behind (a Prefect server of a killed harness) goes with it.
    proc = subprocess.Popen(command, cwd=source, env=env, start_new_session=True)
    try:
        proc.wait(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"the run did not end within {RUN_TIMEOUT_SECONDS} s", flush=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, env=env)
    print(f"   {time.monotonic() - started:.0f} s", flush=True)
    return outcomes(junit)


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    if not junit.exists():
        return {}
    result = {}
    for case in ET.parse(junit).iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        result[test_id] = (outcome, float(case.get("time") or 0))
    return result


def report(results: dict[str, dict[str, tuple[str, float]]]) -> int:
    """Counts per run and the differences from the baseline; the number of regressions."""
    print("\n| run | passed | failed | errors | skipped | total |\n|---|---|---|---|---|---|")
    for name, found in results.items():
        counts = {k: sum(1 for outcome, _ in found.values() if outcome == k)
                  for k in ("passed", "failed", "error", "skipped")}
        print(f"| {RUNS[name][0]} | {counts['passed']} | {counts['failed']} | {counts['error']} | "
              f"{counts['skipped']} | {len(found)} |")
    baseline = results.get("ray", {})
    regressions = 0
    for name, found in results.items():
        if name == "ray" or not baseline:
            continue
        for test_id in sorted(set(baseline) | set(found)):
            before, after = baseline.get(test_id, ("-", 0.0)), found.get(test_id, ("missing", 0.0))
            if before[0] != after[0] or (after[1] > 3 * before[1] + 10):
                lost = before[0] == "passed" and after[0] != "passed"
                regressions += lost
                print(f"{'REGRESSION' if lost else 'differs'} [{name}] {test_id}: RayTaskRunner {before[0]} "
                      f"{before[1]:.1f} s, BoostRayTaskRunner {after[0]} {after[1]:.1f} s")
    if baseline:
        print(f"\n{regressions} test(s) that pass with RayTaskRunner do not pass with BoostRayTaskRunner")
    return regressions


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(RUNS), help="run only these (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (junit files)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    ensure_plugins()
    workdir = Path(tempfile.mkdtemp(prefix="grid-peer-"))
    try:
        source = fetch_tests(workdir)
        results = {name: run(source, name, extra, workdir) for name in (args.only or list(RUNS))}
        return 1 if report(results) else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
