"""The rules of offloading (pure): which processes are candidates, what may run where.

Two parts here, and one in :mod:`grid_flows.adapters.host.processes`:

* pure helpers (no Ray, no Prefect): whole-word command classification, the filter that
  picks offload candidates from process infos, the cluster view for the scheduler and
  the ``grid offload run ...`` command line that would move a process;
* what may run where (pure): :func:`validate_argv` and :func:`validate_env` refuse
  input no process can take, :func:`command_refusal` applies a node's
  ``allow_offload_commands`` (off by default) and ``offload_commands`` allow-list;
* the process side (:mod:`grid_flows.adapters.host.processes`): :func:`run_command` is the body of the Ray task that starts the command
  on its node (checks again there, then an argument list, never a shell; its own
  session and process group; the node's resource mode applied), streams its output
  back through a ``ray.util.queue.Queue`` and kills the whole process tree
  (:class:`ProcessTree`, also descendants that ``setsid``'d away) on timeout or
  cancellation; :func:`kill_tree` does that from another task; :func:`scan_processes`
  lists the processes of a node with psutil, there.

Example:
    >>> command_words(["/usr/bin/python3.11", "train.py", "--out=/data/run.tar"])
    ['usr', 'bin', 'python3.11', 'train.py', '--out', 'data', 'run.tar']
    >>> has_word(["ray", "start", "--head"], "tar"), has_word(["tar", "-czf", "x.tgz", "."], "tar")
    (False, True)
    >>> classify(["bash", "-l"]), classify(["/usr/bin/ffmpeg", "-i", "a.mkv"]), classify(["sleep", "9"])
    ('shell', 'workload', 'other')

Which processes are candidates (``select_candidates``), decided and documented here:

* kernel threads (no command line, or children of ``kthreadd``, pid 2) are skipped;
* system accounts (``0 < uid < 1000``, e.g. ``systemd-network``, ``messagebus``) are skipped;
* root (uid 0) processes are skipped **unless** their command line names a known heavy
  workload (``python``, ``ffmpeg``, ``make``, ``tar`` ...): a user who runs ``sudo python
  train.py`` or works in a root container still sees their job, while daemons such as
  ``sshd`` or ``containerd`` never show up;
* our own processes (Ray, Prefect, grid) and interactive shells/terminals/editors are skipped;
* processes younger than ``min_age_seconds`` (default 60 s) are skipped: moving a short
  job costs more than it saves;
* the rest are candidates when they use at least ``min_cpu_percent`` of a CPU or
  ``min_rss_bytes`` of memory.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from grid_flows.core.models import Resources
from grid_flows.errors import InvalidRequest
from grid_flows.core.units import format_bytes

_MIB = 1024**2

# --------------------------------------------------------------------------- classification

# Whole words that mark a command line. Interpreters may carry a version (python3.11).
SHELL_WORDS = frozenset(
    {"bash", "sh", "zsh", "fish", "dash", "ksh", "tcsh", "csh", "tmux", "screen", "ssh", "sshd", "mosh",
     "login", "su", "sudo", "vim", "nvim", "vi", "nano", "emacs", "less", "more", "top", "htop", "watch"}
)
OWN_WORDS = frozenset(
    {"ray", "raylet", "gcs_server", "plasma_store", "dashboard", "default_worker.py", "setup_worker.py",
     "log_monitor.py", "monitor.py", "runtime_env", "prefect", "grid", "grid_flows", "uvicorn",
     "dashboard.py", "agent.py", "ray_client_server"}
)
SYSTEM_WORDS = frozenset(
    {"systemd", "init", "kthreadd", "dbus-daemon", "containerd", "dockerd", "cron", "rsyslogd", "journald",
     "systemd-journald", "systemd-logind", "udevd", "polkitd", "networkmanager", "snapd", "process_api"}
)
WORKLOAD_WORDS = frozenset(
    {"python", "python3", "ffmpeg", "make", "ninja", "gcc", "g++", "cc1", "cc1plus", "clang", "rustc", "cargo",
     "go", "java", "node", "tar", "gzip", "xz", "zstd", "bzip2", "rsync", "blender", "matlab", "julia",
     "Rscript", "cmake", "bazel", "torchrun", "accelerate", "jupyter", "handbrakecli", "x264", "x265",
     "stress", "stress-ng", "sha256sum", "md5sum", "convert", "ld", "lld"}
)
_SPLIT = re.compile(r"[\s/=:,;\"'()\[\]{}|&<>]+")
_VERSION = re.compile(r"^(?P<stem>.+?)(?:[-_]?\d+(?:\.\d+)*)$")
# ray's worker processes rename themselves: "ray::IDLE", "ray::_run_command"
_RAY_TITLE = re.compile(r"^ray::")


def command_words(cmdline: Sequence[str] | str) -> list[str]:
    """The whole words of a command line: arguments split at spaces, slashes, '=', ':' ...

    Dots, dashes and underscores stay inside a word, so ``run.tar`` is one word and
    ``start`` never contains the word ``tar``.
    """
    text = cmdline if isinstance(cmdline, str) else " ".join(cmdline)
    return [w for w in _SPLIT.split(text) if w and w.strip("-")]


def _word_forms(word: str) -> set[str]:
    forms = {word, word.lower()}
    m = _VERSION.match(word)
    if m and not m.group("stem").endswith("."):  # python3.11 -> python; not "x.1"
        forms.add(m.group("stem"))
        forms.add(m.group("stem").lower())
    return forms


def has_word(cmdline: Sequence[str] | str, word: str) -> bool:
    """True when ``word`` is one of the command line's whole words (a version suffix is
    allowed: ``python3.11`` has the word ``python``).

    >>> has_word("restart service", "tar"), has_word("/bin/tar xzf a", "tar"), has_word("tarball", "tar")
    (False, True, False)
    """
    target = {word, word.lower()}
    return any(_word_forms(w) & target for w in command_words(cmdline))


def _matches(cmdline: Sequence[str] | str, words: Iterable[str]) -> Optional[str]:
    wanted = set(words) | {w.lower() for w in words}
    for w in command_words(cmdline):
        hit = _word_forms(w) & wanted
        if hit:
            return sorted(hit)[0]
    return None


def classify(cmdline: Sequence[str] | str, name: str = "") -> str:
    """``own`` (Ray/Prefect/grid), ``system``, ``shell``, ``workload`` (known heavy) or ``other``.

    Only the program (first argument, or the process name) decides ``shell`` and
    ``system``; ``own`` and ``workload`` look at every whole word, so ``python -m
    prefect`` is ``own`` and ``bash -c 'make -j8'`` is a ``workload``.
    """
    args = [cmdline] if isinstance(cmdline, str) else list(cmdline)
    if not isinstance(cmdline, str) and len(args) == 1 and " " in args[0]:
        args = args[0].split()  # processes that rewrote their title into one string
    elif isinstance(cmdline, str):
        args = cmdline.split()
    first = " ".join(args[:1]) or name
    if _RAY_TITLE.match(first) or _RAY_TITLE.match(name or ""):
        return "own"
    if _matches(args, OWN_WORDS) or (name and _matches(name, OWN_WORDS)):
        return "own"
    program = (os.path.basename(first) if first else name).lstrip("-")  # "-bash": a login shell
    if _matches(program, SYSTEM_WORDS) or (name and _matches(name, SYSTEM_WORDS) and not args):
        return "system"
    if _matches(args[1:], WORKLOAD_WORDS) or _matches(program, WORKLOAD_WORDS):
        return "workload"
    if _matches(program, SHELL_WORDS):
        return "shell"
    return "other"


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class ProcInfo:
    """What a scan knows about one process (psutil's view, in plain data)."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    uid: int
    username: str = ""
    ppid: int = 0
    create_time: float = 0.0
    cpu_percent: float = 0.0  # of one CPU: 250 = two and a half CPUs busy
    rss: int = 0
    cwd: str = ""
    terminal: Optional[str] = None


@dataclass(frozen=True)
class Candidate:
    proc: ProcInfo
    kind: str  # classify(): "workload" or "other"
    resources: Resources  # what moving it would ask for
    age_seconds: float


@dataclass(frozen=True)
class Skipped:
    proc: ProcInfo
    why: str


def is_kernel_thread(p: ProcInfo) -> bool:
    return p.pid == 2 or p.ppid == 2 or not p.cmdline


def skip_reason(p: ProcInfo, now: float, *, min_age_seconds: float = 60.0, min_cpu_percent: float = 20.0,
                min_rss_bytes: int = 512 * _MIB, own_pids: Iterable[int] = ()) -> Optional[str]:
    """Why ``p`` is not an offload candidate, or None when it is one."""
    if is_kernel_thread(p):
        return "kernel thread"
    if p.pid in set(own_pids):
        return "our own process"
    kind = classify(p.cmdline, p.name)
    if kind == "own":
        return "Ray/Prefect/grid process"
    if 0 < p.uid < 1000:
        return f"system account (uid {p.uid})"
    if kind == "system":
        return "system process"
    if p.uid == 0 and kind != "workload":
        return "root process that is not a known workload"
    if kind == "shell":
        return "interactive shell or tool"
    age = now - p.create_time
    if age < min_age_seconds:
        return f"short-lived ({age:.0f} s < {min_age_seconds:g} s)"
    if p.cpu_percent < min_cpu_percent and p.rss < min_rss_bytes:
        return f"light ({p.cpu_percent:.0f}% CPU, {format_bytes(p.rss)})"
    return None


def needs_of(p: ProcInfo) -> Resources:
    """What a process would need elsewhere: whole CPUs it keeps busy (at least 1), its RSS in MiB."""
    cpu = max(1, math.ceil(p.cpu_percent / 100.0 - 1e-9))
    memory = int(math.ceil(p.rss / _MIB)) * _MIB
    return Resources(cpu=cpu, memory=memory)


def select_candidates(procs: Iterable[ProcInfo], now: float, **limits: Any) -> tuple[list[Candidate], list[Skipped]]:
    """Split processes into offload candidates (heaviest CPU first) and skipped ones with why."""
    chosen: list[Candidate] = []
    skipped: list[Skipped] = []
    for p in procs:
        why = skip_reason(p, now, **limits)
        if why:
            skipped.append(Skipped(p, why))
        else:
            chosen.append(Candidate(p, classify(p.cmdline, p.name), needs_of(p), now - p.create_time))
    chosen.sort(key=lambda c: (-c.proc.cpu_percent, -c.proc.rss, c.proc.pid))
    return chosen, skipped


def offload_command(argv: Sequence[str], node: Optional[str], resources: Resources, cwd: str = "") -> str:
    """The ``grid offload run ...`` line that would run ``argv`` on ``node``, shell-quoted."""
    parts = ["grid", "offload", "run"]
    if node:
        parts += ["--node", node]
    if resources.cpu:
        parts += ["--cpu", f"{resources.cpu:g}"]
    if resources.gpu:
        parts += ["--gpu", f"{resources.gpu:g}"]
    if resources.memory:
        parts += ["--memory", f"{resources.memory // _MIB}MiB"]
    if cwd:
        parts += ["--cwd", cwd]
    return shlex.join([*parts, "--", *argv])


# --------------------------------------------------------------------------- cluster view


def cluster_view(spec, nodes: Mapping[str, Any], target: str, *, exclude_target: bool = False,
                 only: Optional[Iterable[str]] = None, pressures: Optional[Mapping[str, Any]] = None):
    """A scheduler ClusterView from the cluster spec and ``ray_cluster.grid_nodes()``.

    The target offers its free raw capacity (none when ``exclude_target``: a scan looks
    for somewhere else); every other node offers only its free lendable share. With
    ``only``, nodes outside it are no candidates: the target offers nothing and the
    others are left out of the view. ``pressures`` (:func:`grid_flows.core.policy.placement_pressures`)
    lets strategies that rank by pressure see it; a node without one reads as calm.
    """
    from grid_flows.core.placement import ClusterView, NodeView, Pressure

    def pressure_of(name: str) -> Pressure:
        return (pressures or {}).get(name) or Pressure()

    views = {}
    lenders = {n.name for n in spec.lenders()}
    allowed = None if only is None else set(only)
    for n in spec.nodes:
        info = nodes.get(n.name)
        alive = bool(info and info.alive)
        out = allowed is not None and n.name not in allowed
        if n.name == target:
            free = Resources() if (exclude_target or out or not alive) else info.free
            views[n.name] = NodeView(n.name, alive=alive, free=free, pressure=pressure_of(n.name))
        elif not out:
            lendable = info.lendable_free if (alive and n.name in lenders) else Resources()
            views[n.name] = NodeView(n.name, alive=alive, lendable_free=lendable, pressure=pressure_of(n.name))
    return ClusterView(target=target, nodes=views, allow_offload=spec.resource_sharing.enabled)


# --------------------------------------------------------------------------- what may run where

_NO_COMMANDS = "set allow_offload_commands: true on it in the cluster definition (it is off by default)"


def validate_argv(argv: Any) -> list[str]:
    """``argv`` as a list of strings that ``exec`` can take, or InvalidRequest in one line.

    Refused: one string (it would need a shell), an empty list or program name, a
    non-string argument, and a NUL byte anywhere (no C string can hold one).
    """
    if isinstance(argv, str):
        raise InvalidRequest("command must be a list of arguments, not one string (no shell is used)")
    if not isinstance(argv, (list, tuple)) or not argv:
        raise InvalidRequest("command: give the program and its arguments, e.g. ['python', 'train.py']")
    bad = [a for a in argv if not isinstance(a, str)]
    if bad:
        raise InvalidRequest(f"command: every argument must be a string, got {bad[0]!r}")
    if not argv[0]:
        raise InvalidRequest("command: the program name is empty")
    for i, a in enumerate(argv):
        if "\0" in a:
            raise InvalidRequest(f"command: argument {i} holds a NUL byte, which no program can receive")
    return list(argv)


def validate_env(env: Any, what: str = "env") -> dict[str, str]:
    """``env`` as a dict of strings a child process can take, or InvalidRequest in one line.

    Keys must be non-empty and hold neither '=' nor a NUL byte; values must be strings
    without a NUL byte. Messages name the key, never the value (it may be a secret).
    """
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidRequest(f"{what}: expected a mapping of NAME to value, got {type(env).__name__}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key:
            raise InvalidRequest(f"{what}: variable names must be non-empty strings, got {key!r}")
        if "=" in key or "\0" in key:
            raise InvalidRequest(f"{what}: variable name {key!r} must not hold '=' or a NUL byte")
        if not isinstance(value, str):
            raise InvalidRequest(f"{what}: the value of {key} must be a string, got {type(value).__name__}")
        if "\0" in value:
            raise InvalidRequest(f"{what}: the value of {key} holds a NUL byte")
        out[key] = value
    return out


def command_refusal(node_spec, argv: Sequence[str]) -> str:
    """Why ``argv`` must not start on ``node_spec`` ("" when nothing here refuses it). Pure.

    ``allow_offload_commands`` must be true. An ``offload_commands`` entry that is a bare
    name admits any program with that base name; one that is a path admits what resolves
    to it, which only the node can tell (:func:`executable_on_node`). So this refuses on
    the allow-list only when every entry is a bare name and none is argv[0]'s base name.
    """
    name = node_spec.name
    if not node_spec.allow_offload_commands:
        return f"node '{name}' does not allow offload commands: {_NO_COMMANDS}"
    entries = list(node_spec.offload_commands)
    if entries and all("/" not in e for e in entries) and os.path.basename(argv[0]) not in entries:
        return (f"node '{name}' does not allow running {argv[0]!r}: its offload_commands are "
                f"{', '.join(entries)}")
    return ""


def no_node_allows(refusals: Mapping[str, str]) -> str:
    """The one-line error when ``refusals`` (node -> why) covers every node."""
    if all("does not allow offload commands" in why for why in refusals.values()):
        return f"no node allows offload commands: {_NO_COMMANDS.replace('on it', 'on a node')}"
    return "no node may run this command: " + "; ".join(refusals.values())


