"""Run a command on this node and keep its whole process tree in hand; list the node's processes.

:func:`run_command` is the body of the Ray task that starts an offloaded command on its
node: it checks the command again there (:mod:`grid_flows.core.offload_rules`), starts an
argument list (never a shell) in its own session and process group with the node's
resource mode applied, streams its output back through a queue, and kills the whole
process tree (:class:`ProcessTree`, also descendants that ``setsid``'d away) on timeout or
cancellation. :func:`kill_tree` does that from another task; :func:`scan_processes` lists
the node's processes with psutil.

Example:
    ```python
    from grid_flows.adapters.host.processes import scan_processes

    candidates, skipped = scan_processes(min_cpu_percent=50)
    ```
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from grid_flows.core.offload_rules import (
    Candidate, ProcInfo, Skipped, command_refusal, select_candidates, validate_argv, validate_env,
)
from grid_flows.errors import InvalidRequest


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
