"""Offloading work to where capacity is: run a command on the best node, find candidates.

Two halves:

* pure helpers (no Ray, no Prefect): whole-word command classification, the filter that
  picks offload candidates from process infos, the cluster view for the scheduler and
  the ``grid offload run ...`` command line that would move a process;
* the Ray side: :func:`run_command` is the body of the Ray task that starts the command
  on its node (an argument list, never a shell; its own session and process group;
  the node's resource mode applied) and streams its output back through a
  ``ray.util.queue.Queue``; :func:`kill_group` ends a process group on a node;
  :func:`scan_processes` lists the processes of a node with psutil, there.

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
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from grid_flows.models import Resources
from grid_flows.units import format_bytes

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


def cluster_view(spec, nodes: Mapping[str, Any], target: str, *, exclude_target: bool = False):
    """A scheduler ClusterView from the cluster spec and ``ray_cluster.grid_nodes()``.

    The target offers its free raw capacity (none when ``exclude_target``: a scan looks
    for somewhere else); every other node offers only its free lendable share.
    """
    from grid_flows.scheduler import ClusterView, NodeView

    views = {}
    lenders = {n.name for n in spec.lenders()}
    for n in spec.nodes:
        info = nodes.get(n.name)
        alive = bool(info and info.alive)
        if n.name == target:
            free = Resources() if (exclude_target or not alive) else info.free
            views[n.name] = NodeView(n.name, alive=alive, free=free)
        else:
            lendable = info.lendable_free if (alive and n.name in lenders) else Resources()
            views[n.name] = NodeView(n.name, alive=alive, lendable_free=lendable)
    return ClusterView(target=target, nodes=views, allow_offload=spec.resource_sharing.enabled)


# --------------------------------------------------------------------------- on the node

MINIMAL_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR")


def child_env(extra: Optional[Mapping[str, str]] = None, base: Optional[Mapping[str, str]] = None,
              node: str = "") -> dict[str, str]:
    """A minimal environment (PATH, HOME, USER, LANG ... of the node) with ``extra`` on top.

    Nothing else of the Ray worker leaks in (no RAY_*, no CUDA_VISIBLE_DEVICES unless
    given). PYTHONUNBUFFERED=1 so that Python children stream their output line by line.
    """
    base = os.environ if base is None else base
    env = {k: base[k] for k in MINIMAL_ENV_KEYS if k in base}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    if node:
        env["GRID_OFFLOAD_NODE"] = node
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env: keys and values must be strings, got {key!r}={value!r}")
        env[key] = value
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, grace_seconds: float = 5.0, child=None) -> str:
    """SIGTERM the whole process group, then SIGKILL what is left after ``grace_seconds``.

    ``child`` (a Popen) is reaped while waiting, so the leader does not linger as a zombie.
    Returns what it did, for the log.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        if child is not None:
            child.poll()
        return f"process group {pgid} had already ended"
    deadline = time.monotonic() + max(0.0, grace_seconds)
    while time.monotonic() < deadline:
        if child is not None:
            child.poll()
        if not _group_alive(pgid):
            return f"process group {pgid} ended after SIGTERM"
        time.sleep(0.05)  # bounded by the grace period
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if child is not None:
        try:
            child.wait(timeout=10)
        except Exception:
            pass
    return f"process group {pgid} killed (SIGKILL after {grace_seconds:g} s of SIGTERM)"


@dataclass
class RunResult:
    exit_code: Optional[int]
    pid: Optional[int] = None
    pgid: Optional[int] = None
    timed_out: bool = False
    error: str = ""
    priority: dict = field(default_factory=dict)
    lines: int = 0
    seconds: float = 0.0
    kill: str = ""


def run_command(argv: Sequence[str], cwd: str, env: Mapping[str, str], node_spec, queue,
                timeout_seconds: Optional[float] = None, grace_seconds: float = 5.0,
                put_timeout: float = 30.0) -> RunResult:
    """Body of the offload Ray task: run ``argv`` (no shell) under the node's resource mode.

    Messages on ``queue``: ``("start", pid, pgid)``, ``("stdout"|"stderr", line)``, and
    ``("end", exit_code)``. The task's own priority is lowered first (the task runs with
    ``max_calls=1``, so its worker exits afterwards), so the child is born with it; it is
    applied to the child again right after the start.
    """
    import subprocess

    from grid_flows.guard import apply_process_priority, limits_for

    started = time.monotonic()
    argv = [str(a) for a in argv]
    limits = limits_for(node_spec)
    apply_process_priority(limits)  # this worker: the child inherits nice and ionice from birth
    if not os.path.isdir(cwd):
        return RunResult(exit_code=None, error=f"working directory {cwd!r} does not exist on {node_spec.name}")
    try:
        child = subprocess.Popen(
            argv, shell=False, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
    except FileNotFoundError:
        return RunResult(exit_code=127, error=f"command not found on {node_spec.name}: {argv[0]}")
    except PermissionError as exc:
        return RunResult(exit_code=126, error=f"cannot run {argv[0]} on {node_spec.name}: {exc}")
    result = RunResult(exit_code=None, pid=child.pid, pgid=child.pid)  # new session: pgid == pid
    result.priority = apply_process_priority(limits, pid=child.pid)
    queue.put(("start", child.pid, child.pid), timeout=put_timeout)
    count = [0]
    lock = threading.Lock()

    def pump(stream, label: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                queue.put((label, line), timeout=put_timeout)
            except Exception:
                pass  # the driver went away: keep draining so the child never blocks on a full pipe
            with lock:
                count[0] += 1
        stream.close()

    pumps = [threading.Thread(target=pump, args=(child.stdout, "stdout"), daemon=True),
             threading.Thread(target=pump, args=(child.stderr, "stderr"), daemon=True)]
    for t in pumps:
        t.start()
    try:
        child.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        result.timed_out = True
        result.kill = kill_group(child.pid, grace_seconds, child)
    finally:
        if child.returncode is None:  # interrupted (ray.cancel): never leave the group behind
            result.kill = kill_group(child.pid, grace_seconds, child)
    # Grandchildren that outlive the leader keep the pipes open: end the group when the leader ends.
    if _group_alive(child.pid):
        result.kill = result.kill or kill_group(child.pid, grace_seconds, None)
    for t in pumps:
        t.join(timeout=10)
    result.exit_code = child.returncode
    result.lines = count[0]
    result.seconds = time.monotonic() - started
    queue.put(("end", result.exit_code), timeout=put_timeout)
    return result


def proc_infos() -> list[ProcInfo]:
    """Every process of this machine as ProcInfo (CPU % measured over ~0.5 s)."""
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            p.cpu_percent(None)  # prime the counter
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(0.5)  # the sampling window of cpu_percent, not a synchronisation
    infos = []
    for p in procs:
        try:
            with p.oneshot():
                uids = p.uids()
                try:
                    cwd = p.cwd()
                except psutil.Error:
                    cwd = ""
                infos.append(ProcInfo(
                    pid=p.pid, name=p.name(), cmdline=tuple(p.cmdline()), uid=int(uids.real),
                    username=_safe(p.username), ppid=p.ppid(), create_time=p.create_time(),
                    cpu_percent=p.cpu_percent(None), rss=p.memory_info().rss, cwd=cwd,
                    terminal=_safe(p.terminal) or None,
                ))
        except psutil.Error:
            continue
    return infos


def _safe(fn) -> str:
    try:
        return fn() or ""
    except Exception:
        return ""


def scan_processes(**limits: Any) -> tuple[list[Candidate], list[Skipped]]:
    """On the node: its processes split into candidates and skipped ones (this worker excluded)."""
    own = {os.getpid(), os.getppid()}
    return select_candidates(proc_infos(), time.time(), own_pids=own, **limits)
