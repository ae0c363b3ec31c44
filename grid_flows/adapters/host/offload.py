"""Offloading work to where capacity is: run a command on the best node, find candidates.

Three parts:

* pure helpers (no Ray, no Prefect): whole-word command classification, the filter that
  picks offload candidates from process infos, the cluster view for the scheduler and
  the ``grid offload run ...`` command line that would move a process;
* what may run where (pure): :func:`validate_argv` and :func:`validate_env` refuse
  input no process can take, :func:`command_refusal` applies a node's
  ``allow_offload_commands`` (off by default) and ``offload_commands`` allow-list;
* the Ray side: :func:`run_command` is the body of the Ray task that starts the command
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

import errno
import math
import os
import re
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
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
                 only: Optional[Iterable[str]] = None):
    """A scheduler ClusterView from the cluster spec and ``ray_cluster.grid_nodes()``.

    The target offers its free raw capacity (none when ``exclude_target``: a scan looks
    for somewhere else); every other node offers only its free lendable share. With
    ``only``, nodes outside it are no candidates: the target offers nothing and the
    others are left out of the view.
    """
    from grid_flows.core.placement import ClusterView, NodeView

    views = {}
    lenders = {n.name for n in spec.lenders()}
    allowed = None if only is None else set(only)
    for n in spec.nodes:
        info = nodes.get(n.name)
        alive = bool(info and info.alive)
        out = allowed is not None and n.name not in allowed
        if n.name == target:
            free = Resources() if (exclude_target or out or not alive) else info.free
            views[n.name] = NodeView(n.name, alive=alive, free=free)
        elif not out:
            lendable = info.lendable_free if (alive and n.name in lenders) else Resources()
            views[n.name] = NodeView(n.name, alive=alive, lendable_free=lendable)
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


def resolve_executable(program: str, cwd: str, path: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """What ``exec`` would run for ``program`` in ``cwd`` with ``PATH=path``: ``(found, real)``,
    the file found (a PATH search result, else ``program`` itself) and its real path with
    symlinks resolved; ``(None, None)`` when there is no such file."""
    import shutil

    if "/" in program:
        full = os.path.join(cwd, program)
        return (program, os.path.realpath(full)) if os.path.isfile(full) else (None, None)
    dirs = (path if path is not None else os.defpath).split(os.pathsep)
    found = shutil.which(program, path=os.pathsep.join(os.path.join(cwd, d) for d in dirs))
    return (found, os.path.realpath(found)) if found else (None, None)


def executable_on_node(node_spec, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> Optional[str]:
    """On the node, right before the start: the check of :func:`command_refusal` again, and
    the path entries of ``offload_commands`` compared with argv[0]'s real path there.

    Returns the file PATH search found when a path entry admitted a bare name (exec'd as
    it is, so what runs is what was checked), else None; raises InvalidRequest when refused.
    """
    why = command_refusal(node_spec, argv)
    if why:
        raise InvalidRequest(why)
    entries = list(node_spec.offload_commands)
    if not entries or os.path.basename(argv[0]) in entries:
        return None
    found, real = resolve_executable(argv[0], cwd, env.get("PATH"))
    if real and any("/" in e and os.path.realpath(os.path.join(cwd, e)) == real for e in entries):
        return found if "/" not in argv[0] else None  # a path is exec'd without a search anyway
    shown = f"{argv[0]!r}" + (f" (= {real})" if real and real != argv[0] else "")
    raise InvalidRequest(f"node '{node_spec.name}' does not allow running {shown}: its offload_commands are "
                         f"{', '.join(entries)}")


# --------------------------------------------------------------------------- on the node

MINIMAL_ENV_KEYS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR")


def child_env(extra: Optional[Mapping[str, str]] = None, base: Optional[Mapping[str, str]] = None,
              node: str = "") -> dict[str, str]:
    """A minimal environment (PATH, HOME, USER, LANG ... of the node) with ``extra`` on top.

    Nothing else of the Ray worker leaks in (no RAY_*, no CUDA_VISIBLE_DEVICES unless
    given). PYTHONUNBUFFERED=1 so that Python children stream their output line by line.
    ``extra`` is checked with :func:`validate_env` (InvalidRequest names the key only).
    """
    base = os.environ if base is None else base
    env = {k: base[k] for k in MINIMAL_ENV_KEYS if k in base}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    if node:
        env["GRID_OFFLOAD_NODE"] = node
    env.update(validate_env(extra))
    return env


def become_subreaper() -> bool:
    """Make this process the Linux child subreaper of its descendants: an orphan (e.g. the
    grandchild of a double fork) is re-parented here instead of to init, so it stays in
    the tree :class:`ProcessTree` watches. Best effort; False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


class ProcessTree:
    """Every process a command started, for killing all of them.

    ``track(pid)`` names the leader; each :meth:`scan` adds its current descendants
    (psutil ``children(recursive=True)``) to the set of processes ever seen, so a
    grandchild that ``setsid``'d and lost its parent is still remembered. With
    ``adopt_orphans`` (this process is a subreaper, see :func:`become_subreaper`) new
    children of this process count too: re-parented orphans land there. psutil
    ``Process`` objects carry their create time, so a reused pid is never signalled.
    """

    def __init__(self, adopt_orphans: bool = False):
        import psutil

        self._me = psutil.Process()
        self._adopt = adopt_orphans
        self._before = {p.pid for p in self._me.children()} if adopt_orphans else set()
        self.leader: Optional[int] = None
        self.seen: dict[int, Any] = {}

    def track(self, pid: int, create_time: Optional[float] = None) -> "ProcessTree":
        import psutil

        self.leader = pid
        try:
            p = psutil.Process(pid)
            if create_time is None or abs(p.create_time() - create_time) < 0.01:
                self.seen[pid] = p
        except psutil.Error:
            pass
        return self

    def scan(self, group: bool = False) -> None:
        """Remember the current descendants; with ``group``, also every live member of the
        leader's process group started after the leader (one pass over all processes)."""
        import psutil

        roots = [self.seen[self.leader]] if self.leader in self.seen else []
        if self._adopt:
            try:
                roots += [c for c in self._me.children() if c.pid not in self._before]
            except psutil.Error:
                pass
        for root in roots:
            try:
                found = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in found:
                self.seen.setdefault(p.pid, p)
        if group and self.leader is not None and self.leader in self.seen:
            born = self.seen[self.leader].create_time()
            for p in psutil.process_iter():
                try:
                    if p.pid not in self.seen and os.getpgid(p.pid) == self.leader and p.create_time() >= born:
                        self.seen[p.pid] = p
                except (psutil.Error, OSError):
                    continue

    def alive(self) -> list:
        """Tracked processes still running (same create time, not a zombie)."""
        import psutil

        live = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
            except psutil.Error:
                continue
        return live

    def reap(self, skip: Optional[int] = None) -> None:
        """Collect the exit status of adopted orphans that ended (else they stay zombies here)."""
        if not self._adopt:
            return
        for pid in list(self.seen):
            if pid == skip:
                continue  # the leader is Popen's to wait for
            try:
                os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, OSError):
                pass

    def kill(self, grace_seconds: float = 5.0, child=None) -> str:
        """SIGTERM every live tracked process, SIGKILL what is left after ``grace_seconds``.

        Rescans while waiting (a process may fork in its SIGTERM handler). ``child`` (the
        leader's Popen) is reaped while waiting. Returns what it did ("" when nothing ran).
        """
        import psutil

        leader = self.leader
        self.scan(group=True)
        live = self.alive()
        if not live:
            self._settle(child)
            return ""
        signalled: set[int] = set()

        def signal_all(sig) -> None:
            for p in self.alive():
                try:
                    p.send_signal(sig)
                    signalled.add(p.pid)
                except psutil.Error:
                    pass

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, grace_seconds)
        while time.monotonic() < deadline:
            self._settle(child, wait=False)
            self.scan()
            if not self.alive():
                self._settle(child)
                return f"process tree of {leader} ended after SIGTERM ({len(signalled)} processes)"
            signal_all(signal.SIGTERM)  # newcomers get their SIGTERM too
            time.sleep(0.05)  # bounded by the grace period
        for _ in range(50):  # a few rounds: a process may fork between scan and SIGKILL
            self.scan()
            if not self.alive():
                break
            signal_all(signal.SIGKILL)
            time.sleep(0.02)  # bounded by the 50 rounds
        self._settle(child)
        left = len(self.alive())
        return (f"process tree of {leader} killed ({len(signalled)} processes; SIGKILL after "
                f"{grace_seconds:g} s of SIGTERM)" + (f"; {left} could not be killed" if left else ""))

    def _settle(self, child, wait: bool = True) -> None:
        if child is not None:
            try:
                child.wait(timeout=10) if wait else child.poll()
            except Exception:
                pass
        self.reap(skip=child.pid if child is not None else None)


def kill_tree(pid: int, grace_seconds: float = 5.0, create_time: Optional[float] = None) -> str:
    """From another process on the node: kill the command led by ``pid`` and everything it
    started that is still linked to it (descendants, members of its process group)."""
    tree = ProcessTree().track(pid, create_time)
    return tree.kill(grace_seconds) or f"the command led by pid {pid} had already ended"


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


_SCAN_SECONDS = 0.25  # how often the process tree is rescanned while the command runs


def run_command(argv: Sequence[str], cwd: str, env: Mapping[str, str], node_spec, queue,
                timeout_seconds: Optional[float] = None, grace_seconds: float = 5.0,
                put_timeout: float = 30.0, subreaper: bool = False) -> RunResult:
    """Body of the offload Ray task: run ``argv`` (no shell) under the node's resource mode.

    Refuses (``RunResult.error``, no exit code) what the node's ``allow_offload_commands``
    / ``offload_commands`` do not admit, and bad arguments or environment, before
    anything starts. A program that cannot be executed gives exit code 127 (not found)
    or 126 (e.g. a script without a shebang line) and a one-line ``error``.

    Messages on ``queue``: ``("start", pid, pgid, create_time)``, ``("stdout"|"stderr",
    line)``, and ``("end", exit_code)``. The task's own priority is lowered first (the
    task runs with ``max_calls=1``, so its worker exits afterwards), so the child is born
    with it; it is applied to the child again right after the start.

    The whole process tree is watched while the command runs (:class:`ProcessTree`, with
    ``subreaper`` also orphans) and killed on timeout, on interruption (``ray.cancel``)
    and when the leader exits while descendants live on.
    """
    import subprocess

    from grid_flows.adapters.host.guard import apply_process_priority
    from grid_flows.core.modes import limits_for

    started = time.monotonic()
    try:
        argv = validate_argv(list(argv) if isinstance(argv, tuple) else argv)
        env = validate_env(env)
        if not isinstance(cwd, str) or "\0" in cwd:
            raise InvalidRequest(f"working directory {cwd!r} is not a valid path")
        if not os.path.isdir(cwd):
            raise InvalidRequest(f"working directory {cwd!r} does not exist on {node_spec.name}")
        executable = executable_on_node(node_spec, argv, cwd, env)
    except InvalidRequest as exc:
        return RunResult(exit_code=None, error=str(exc))
    limits = limits_for(node_spec)
    apply_process_priority(limits)  # this worker: the child inherits nice and ionice from birth
    tree = ProcessTree(adopt_orphans=subreaper and become_subreaper())
    program = argv[0]
    try:
        child = subprocess.Popen(
            argv, executable=executable, shell=False, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
    except FileNotFoundError:
        return RunResult(exit_code=127, error=f"command not found on {node_spec.name}: {program}")
    except PermissionError as exc:
        return RunResult(exit_code=126, error=f"cannot run {program} on {node_spec.name}: {exc.strerror or exc}")
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:
            return RunResult(exit_code=126, error=f"cannot execute {program}: not an executable or no shebang line")
        return RunResult(exit_code=126, error=f"cannot run {program} on {node_spec.name}: {exc.strerror or exc}")
    except (ValueError, TypeError) as exc:  # validated above; kept so nothing ends in a traceback
        return RunResult(exit_code=None, error=f"cannot start {program} on {node_spec.name}: {exc}")
    result = RunResult(exit_code=None, pid=child.pid, pgid=child.pid)  # new session: pgid == pid
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
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    try:  # from right after the start: an interruption anywhere below still kills the tree
        tree.track(child.pid)
        result.priority = apply_process_priority(limits, pid=child.pid)
        leader = tree.seen.get(child.pid)
        queue.put(("start", child.pid, child.pid, leader.create_time() if leader else None), timeout=put_timeout)
        for t in pumps:
            t.start()
        while True:
            tree.scan()
            tree.reap(skip=child.pid)
            wait = _SCAN_SECONDS if deadline is None else max(0.0, min(_SCAN_SECONDS, deadline - time.monotonic()))
            try:
                child.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    result.timed_out = True
                    result.kill = tree.kill(grace_seconds, child)
                    break
    finally:
        if child.returncode is None:  # interrupted (ray.cancel): never leave the tree behind
            if child.pid not in tree.seen:
                tree.track(child.pid)
            what = tree.kill(grace_seconds, child)
            result.kill = result.kill or what
            try:
                queue.put(("kill", what), timeout=5)  # the driver logs it: this task may end in an exception
            except BaseException:
                pass
    # Descendants that outlive the leader keep the pipes open: end them when the leader ends.
    result.kill = result.kill or tree.kill(grace_seconds, child)
    for t in pumps:
        if t.ident is not None:  # started
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
