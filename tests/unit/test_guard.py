"""The guard without Ray: mode table and VRAM decisions (core.modes), priority and NVML probe
(adapters.host.guard), throttle arithmetic, and guard_task with an injected throttle."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from grid_flows.adapters.host import guard
from grid_flows.adapters.ray import throttle
from grid_flows.adapters.host.guard import NvmlProbe, admit_gpu_task, apply_process_priority, apply_vram_cap
from grid_flows.core.modes import GpuDevice, ModeLimits, check_vram, limits_for, limits_for_mode, vram_env
from grid_flows.adapters.ray.throttle import GpuThrottle, ThrottleSlot
from grid_flows.runner import worker
from grid_flows.runner.worker import guard_task
from grid_flows.core.models import ModeOverrides, NodeSpec, ResourceMode
from grid_flows.errors import GpuProbeError, GpuUnavailable, GridError, VramCapExceeded

GIB = 1024**3
MIB = 1024**2


class FakeProbe:
    """An NVML-shaped probe whose answers the test scripts: one list per call, the last repeats."""

    def __init__(self, *answers, status="fake"):
        self.answers = list(answers)
        self.status = status
        self.calls = 0

    def devices(self):
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def gpu(used_gib: float, total_gib: float = 10, index: int = 0) -> list[GpuDevice]:
    return [GpuDevice(index=index, total_bytes=int(total_gib * GIB), used_bytes=int(used_gib * GIB), utilization_percent=5.0)]


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --------------------------------------------------------------------------- mode table


@pytest.mark.parametrize(
    "mode, cap, interval, nice, io_class, io_level",
    [
        ("conservative", 0.50, 100, 10, "idle", None),
        ("default", 0.70, 50, 5, "best-effort", 7),
        ("aggressive", 0.95, 0, None, None, None),
    ],
)
def test_mode_table(mode, cap, interval, nice, io_class, io_level):
    limits = limits_for_mode(mode)
    assert limits.mode is ResourceMode(mode)
    assert (limits.vram_cap, limits.gpu_interval_ms, limits.nice, limits.ionice_class, limits.ionice_level) == (
        cap,
        interval,
        nice,
        io_class,
        io_level,
    )


def test_limits_for_node_applies_overrides_and_names_the_node():
    node = NodeSpec(
        name="desk",
        mode="conservative",
        mode_overrides={"vram_cap": 0.3, "gpu_interval_ms": 250, "nice": 15},
    )
    limits = limits_for(node)
    assert limits == ModeLimits(ResourceMode.conservative, 0.3, 250.0, 15, "idle", None, node="desk",
                                default_vram_share=0.25)
    assert limits.gpu_interval_seconds == 0.25


@pytest.mark.parametrize("mode, share", [("conservative", 0.25), ("default", 0.20), ("aggressive", 0.10)])
def test_default_vram_need_of_each_mode(mode, share):
    """What a GPU task that states no VRAM is assumed to need, as README and the module table say."""
    assert limits_for_mode(mode).default_vram_share == share
    # An unstated task starts only while the device is at most cap - share used: 25 / 50 / 85 %.
    limits = limits_for_mode(mode)
    assert check_vram(limits, None, FakeProbe(gpu(10 * (limits.vram_cap - share) - 0.01))).ok
    assert not check_vram(limits, None, FakeProbe(gpu(10 * (limits.vram_cap - share) + 0.01))).ok


def test_default_vram_need_never_exceeds_a_lowered_cap():
    limits = limits_for_mode("conservative", ModeOverrides(vram_cap=0.1))
    assert limits.default_vram_share == 0.1  # clamped: an idle device still admits an unstated task
    assert check_vram(limits, None, FakeProbe(gpu(0))).ok


def test_limits_for_node_without_overrides_is_the_table_row():
    limits = limits_for(NodeSpec(name="n", mode="aggressive"))
    assert (limits.vram_cap, limits.gpu_interval_ms, limits.nice, limits.ionice_class) == (0.95, 0.0, None, None)
    assert limits_for(NodeSpec(name="n")).mode is ResourceMode.default


def test_ionice_overrides():
    be = limits_for_mode("conservative", ModeOverrides(ionice_class="best-effort"))
    assert (be.ionice_class, be.ionice_level) == ("best-effort", 7)  # lowest best-effort unless told
    be3 = limits_for_mode("conservative", ModeOverrides(ionice_class="best-effort", ionice_level=3))
    assert (be3.ionice_class, be3.ionice_level) == ("best-effort", 3)
    normal = limits_for_mode("default", ModeOverrides(ionice_class="normal"))
    assert (normal.ionice_class, normal.ionice_level) == (None, None)
    level_only = limits_for_mode("aggressive", ModeOverrides(ionice_level=4))
    assert (level_only.ionice_class, level_only.ionice_level) == ("best-effort", 4)
    idle = limits_for_mode("default", ModeOverrides(ionice_class="idle", ionice_level=2))
    assert (idle.ionice_class, idle.ionice_level) == ("idle", None)  # idle has no level
    zero = limits_for_mode("aggressive", ModeOverrides(gpu_interval_ms=0, vram_cap=1))
    assert (zero.gpu_interval_ms, zero.vram_cap) == (0.0, 1.0)


def test_describe():
    assert limits_for_mode("conservative").describe() == (
        "conservative: VRAM cap 50%, 100 ms between GPU starts, nice 10, ionice idle"
    )
    assert limits_for_mode("aggressive").describe() == "aggressive: VRAM cap 95%, no GPU throttle, normal priority"


# --------------------------------------------------------------------------- VRAM decisions


def test_check_vram_within_and_at_the_cap():
    limits = limits_for_mode("default")  # 70 % of 10 GiB = 7 GiB
    d = check_vram(limits, 2 * GIB, FakeProbe(gpu(4)))
    assert d.ok and d.used_bytes == 4 * GIB and d.cap_bytes == int(0.7 * 10 * GIB)
    assert "fits in the default cap of 70% of 10 GiB" in d.reason
    exactly = check_vram(limits, int(0.7 * 10 * GIB) - 4 * GIB, FakeProbe(gpu(4)))
    assert exactly.ok  # used + need == cap is allowed


def test_check_vram_over_the_cap_names_usage_need_and_cap():
    limits = limits_for_mode("conservative", node=None)
    d = check_vram(limits, 2 * GIB, FakeProbe(gpu(4)))
    assert not d.ok and d.retryable
    assert d.reason == "GPU 0: 4 GiB used + 2 GiB needed is over the conservative cap of 50% of 10 GiB (5 GiB)"


def test_check_vram_without_gpu():
    limits = limits_for(NodeSpec(name="laptop"))
    d = check_vram(limits, 1 * GIB, FakeProbe([], status="no NVIDIA driver"))
    assert not d.ok and not d.retryable
    assert d.reason == "node 'laptop' has no GPU to give 1 GiB of VRAM (no NVIDIA driver)"
    probe = FakeProbe([])
    assert check_vram(limits, 0, probe).ok and probe.calls == 0  # nothing needed: nothing asked


def test_check_vram_unstated_need_is_the_modes_share_of_the_device():
    limits = limits_for_mode("conservative", node="gpu1")  # cap 50% of 10 GiB, unstated need 25%
    fits = check_vram(limits, None, FakeProbe(gpu(2)))
    assert fits.ok and fits.need_bytes == int(0.25 * 10 * GIB) and fits.cap_bytes == 5 * GIB
    held = check_vram(limits, None, FakeProbe(gpu(4)))
    assert not held.ok and held.retryable and held.need_bytes == int(0.25 * 10 * GIB)
    assert held.reason == (
        "node 'gpu1' GPU 0: 4 GiB used + 2.5 GiB assumed needed (no VRAM stated: the conservative default of "
        "25% of the device) is over the conservative cap of 50% of 10 GiB (5 GiB)"
    )


def test_check_vram_unstated_need_without_gpu_is_not_checked():
    d = check_vram(limits_for_mode("default", node="gpu1"), None, FakeProbe([], status="no NVIDIA driver"))
    assert d.ok and d.need_bytes == 0
    assert d.reason == "no VRAM stated and node 'gpu1' shows no GPU to check (no NVIDIA driver): not checked"


def test_check_vram_need_above_the_cap_of_an_idle_device_cannot_be_waited_for():
    d = check_vram(limits_for_mode("conservative", node="gpu1"), 6 * GIB, FakeProbe(gpu(0)))
    assert not d.ok and not d.retryable
    assert d.reason == (
        "node 'gpu1' GPU 0: 6 GiB needed is more than the conservative cap of 50% of 10 GiB (5 GiB) even with the GPU idle"
    )


def test_check_vram_unknown_device():
    d = check_vram(limits_for_mode("default"), GIB, FakeProbe(gpu(1)), device_index=3)
    assert not d.ok and not d.retryable and "GPU 3 does not exist (GPUs: 0)" in d.reason


def test_check_vram_nvml_error_is_raised():
    probe = FakeProbe(GpuProbeError("NVML query failed: GPU is lost"))
    with pytest.raises(GpuProbeError, match="GPU is lost"):
        check_vram(limits_for_mode("default"), GIB, probe)
    assert issubclass(GpuProbeError, GridError)


def test_check_vram_rejects_negative_need():
    with pytest.raises(ValueError):
        check_vram(limits_for_mode("default"), -1, FakeProbe(gpu(1)))


def test_admit_waits_until_usage_drops():
    t = FakeTime()
    probe = FakeProbe(gpu(6), gpu(6), gpu(6), gpu(2))
    limits = limits_for_mode("default")
    d = admit_gpu_task(limits, 2 * GIB, probe, wait_seconds=30, poll_seconds=0.5, sleep=t.sleep, clock=t.clock)
    assert d.ok and probe.calls == 4
    assert t.sleeps == [0.5, 0.5, 0.5]
    assert d.waited_seconds == pytest.approx(1.5)


def test_admit_times_out_with_a_clear_error():
    t = FakeTime()
    probe = FakeProbe(gpu(9))
    node = NodeSpec(name="gpu1", mode="default")
    with pytest.raises(VramCapExceeded) as exc:
        admit_gpu_task(limits_for(node), 2 * GIB, probe, wait_seconds=2, poll_seconds=0.5, sleep=t.sleep, clock=t.clock)
    msg = str(exc.value)
    assert "node 'gpu1' GPU 0: 9 GiB used + 2 GiB needed is over the default cap of 70% of 10 GiB (7 GiB)" in msg
    assert "waiting 2.0 s" in msg
    assert sum(t.sleeps) == pytest.approx(2.0)  # bounded: never sleeps past the deadline
    assert isinstance(exc.value, GridError)


def test_admit_without_gpu_fails_at_once_and_need_zero_passes():
    t = FakeTime()
    with pytest.raises(GpuUnavailable, match="no GPU"):
        admit_gpu_task(limits_for_mode("default"), GIB, FakeProbe([]), sleep=t.sleep, clock=t.clock)
    assert t.sleeps == []
    assert admit_gpu_task(limits_for_mode("default"), 0, FakeProbe([]), sleep=t.sleep, clock=t.clock).ok


def test_admit_fails_at_once_for_a_need_above_the_cap():
    t = FakeTime()
    probe = FakeProbe(gpu(0))
    with pytest.raises(VramCapExceeded, match=r"6 GiB needed is more than the conservative cap of 50%"):
        admit_gpu_task(limits_for_mode("conservative"), 6 * GIB, probe, wait_seconds=30, sleep=t.sleep, clock=t.clock)
    assert probe.calls == 1 and t.sleeps == []


def test_admit_holds_an_unstated_task_until_the_default_fits():
    t = FakeTime()
    probe = FakeProbe(gpu(4), gpu(4), gpu(2))  # conservative: 25% of 10 GiB assumed, cap 5 GiB
    d = admit_gpu_task(limits_for_mode("conservative"), None, probe, wait_seconds=30, poll_seconds=0.5,
                       sleep=t.sleep, clock=t.clock)
    assert d.ok and probe.calls == 3 and d.waited_seconds == pytest.approx(1.0)


def test_admit_propagates_probe_errors_without_waiting():
    t = FakeTime()
    with pytest.raises(GpuProbeError):
        admit_gpu_task(limits_for_mode("default"), GIB, FakeProbe(GpuProbeError("boom")), sleep=t.sleep, clock=t.clock)
    assert t.sleeps == []


# --------------------------------------------------------------------------- cap export


def test_vram_env_uses_the_mps_format():
    env = vram_env(limits_for_mode("default"), 8 * GIB)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=5734M"  # floor(0.7 * 8192 MiB)
    assert env["GRID_VRAM_CAP"] == "0.7"
    assert env["GRID_VRAM_LIMIT_BYTES"] == str(int(0.7 * 8 * GIB))
    two = vram_env(limits_for_mode("conservative"), [8 * GIB, 24 * GIB])
    assert two["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M,1=12288M"


def test_apply_vram_cap_sets_env_for_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    for key in ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "GRID_VRAM_CAP", "GRID_VRAM_LIMIT_BYTES"):
        monkeypatch.delenv(key, raising=False)
    probe = FakeProbe(gpu(0, 8, index=0) + gpu(0, 16, index=1))
    out = apply_vram_cap(limits_for_mode("conservative"), probe)
    import os

    assert os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=8192M"  # the task's device 0 is physical GPU 1
    assert out["env"]["GRID_VRAM_CAP"] == "0.5"
    assert out["torch"] in {"torch not imported"} or out["torch"].startswith("torch")


def test_apply_vram_cap_without_gpu_sets_nothing(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", raising=False)
    out = apply_vram_cap(limits_for_mode("default"), FakeProbe([], status="no NVIDIA driver"))
    assert out["env"] == {} and "no NVIDIA driver" in out["skipped"]
    import os

    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in os.environ


def test_apply_vram_cap_calls_torch_only_when_already_imported(monkeypatch):
    calls = []

    class FakeCuda:
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def device_count():
            return 2

        @staticmethod
        def set_per_process_memory_fraction(fraction, device):
            calls.append((fraction, device))

    class FakeTorch:
        cuda = FakeCuda

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    for key in ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "GRID_VRAM_CAP", "GRID_VRAM_LIMIT_BYTES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    out = apply_vram_cap(limits_for_mode("default"), FakeProbe(gpu(1)))
    assert calls == [(0.7, 0), (0.7, 1)]
    assert out["torch"] == "torch memory fraction 0.7 on 2 device(s)"

    FakeCuda.is_available = staticmethod(lambda: False)
    calls.clear()
    assert apply_vram_cap(limits_for_mode("default"), FakeProbe(gpu(1)))["torch"] == "torch has no CUDA: skipped"
    assert calls == []


# --------------------------------------------------------------------------- NVML on this machine


def _real_gpus() -> list:
    try:
        return NvmlProbe().devices()
    except GpuProbeError:  # a broken driver: the no-GPU and error tests cover it
        return []


_REAL_GPUS = _real_gpus()


@pytest.mark.skipif(bool(_REAL_GPUS), reason="this machine has an NVIDIA GPU (see the real-NVML test)")
def test_nvml_probe_reports_no_gpu_cleanly():
    probe = NvmlProbe()
    assert probe.devices() == []
    assert "NVIDIA" in probe.status or "NVML" in probe.status


@pytest.mark.skipif(not _REAL_GPUS, reason="no NVIDIA GPU on this machine: the real NVML path needs one")
def test_vram_guard_with_the_real_nvml_probe():  # pragma: no cover - only where a GPU exists
    probe = NvmlProbe()
    device = probe.devices()[0]
    assert device.total_bytes > 0 and 0 <= device.used_bytes <= device.total_bytes
    limits = limits_for_mode("aggressive")  # cap 95%
    room = int(limits.vram_cap * device.total_bytes) - device.used_bytes
    if room > 2**20:
        assert check_vram(limits, 2**20, probe).ok  # 1 MiB fits under the cap
    assert not check_vram(limits, device.total_bytes + 1, probe).ok  # more than the device holds never does
    assert vram_env(limits, device.total_bytes)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"].startswith("0=")


def test_nvml_probe_raises_on_other_nvml_errors(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    with pytest.raises(GpuProbeError, match="NVML could not start"):
        NvmlProbe().devices()


def test_nvml_probe_reads_devices(monkeypatch):
    import pynvml

    class Mem:
        total, used = 8 * GIB, 3 * GIB

    class Util:
        gpu = 42

    shutdowns = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: Mem)

    def util(handle):
        if handle == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return Util

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", util)
    probe = NvmlProbe()
    assert probe.devices() == [GpuDevice(0, 8 * GIB, 3 * GIB, 42.0), GpuDevice(1, 8 * GIB, 3 * GIB, None)]
    assert probe.status == "2 NVIDIA GPU(s)" and shutdowns == [1]

    def lost(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lost)
    with pytest.raises(GpuProbeError, match="NVML query failed"):
        probe.devices()
    assert shutdowns == [1, 1]


# --------------------------------------------------------------------------- process priority


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _ionice(pid):
    io = psutil.Process(pid).ionice()
    return int(io.ioclass), int(io.value or 0)


def test_conservative_priority_on_a_child_process(child):
    assert psutil.Process(child).nice() == 0
    out = apply_process_priority(limits_for_mode("conservative"), pid=child)
    assert psutil.Process(child).nice() == 10
    assert _ionice(child)[0] == psutil.IOPRIO_CLASS_IDLE
    assert (out["pid"], out["nice_before"], out["nice"], out["ionice"]) == (child, 0, 10, "idle")


def test_default_priority_on_a_child_process(child):
    out = apply_process_priority(limits_for_mode("default"), pid=child)
    assert psutil.Process(child).nice() == 5
    assert _ionice(child) == (psutil.IOPRIO_CLASS_BE, 7)
    assert (out["nice"], out["ionice"]) == (5, "best-effort 7")


def test_aggressive_changes_nothing(child):
    out = apply_process_priority(limits_for_mode("aggressive"), pid=child)
    assert psutil.Process(child).nice() == 0 and _ionice(child)[0] == psutil.IOPRIO_CLASS_NONE
    assert (out["nice"], out["ionice"]) == (None, None)


def test_priority_is_never_raised(child):
    p = psutil.Process(child)
    p.nice(15)
    p.ionice(psutil.IOPRIO_CLASS_IDLE)
    out = apply_process_priority(limits_for_mode("default"), pid=child)
    assert p.nice() == 15 and _ionice(child)[0] == psutil.IOPRIO_CLASS_IDLE
    assert (out["nice"], out["ionice"]) == (None, None)
    assert any("nice 15 kept" in n for n in out["notes"]) and any("ionice idle kept" in n for n in out["notes"])
    # A negative override (which would raise priority) is ignored too, also for root.
    apply_process_priority(limits_for_mode("aggressive", ModeOverrides(nice=-5)), pid=child)
    assert p.nice() == 15


def test_priority_reports_unsupported_ionice(child, monkeypatch):
    def unsupported(self, *args, **kwargs):
        raise NotImplementedError("no ionice here")

    monkeypatch.setattr(psutil.Process, "ionice", unsupported)
    out = apply_process_priority(limits_for_mode("conservative"), pid=child)
    assert out["nice"] == 10 and out["ionice"] is None
    assert any("ionice not supported" in n for n in out["notes"])


def test_priority_of_a_missing_process_is_reported():
    out = apply_process_priority(limits_for_mode("conservative"), pid=2**22 + 12345)
    assert out["nice"] is None and "no process" in out["notes"][0]


# --------------------------------------------------------------------------- throttle arithmetic and guard_task


def test_throttle_reservations_are_spaced_and_counted():
    now = [10.0]
    t = GpuThrottle(clock=lambda: now[0])
    assert [t.reserve(0.1) for _ in range(3)] == pytest.approx([10.0, 10.1, 10.2])
    now[0] = 20.0  # idle for a while: the next start is now, not in the past
    assert t.reserve(0.1) == 20.0 and t.next_start() == pytest.approx(20.1)
    assert t.starts() == 4


def test_throttle_gpu_start_zero_interval_needs_no_ray(monkeypatch):
    monkeypatch.setattr(throttle, "_call_throttle", lambda *a, **k: pytest.fail("must not reach Ray"))
    assert throttle.throttle_gpu_start("gpu1", 0).waited_seconds == 0.0


def test_throttle_gpu_start_sleeps_until_the_slot(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(throttle, "_call_throttle", lambda node, key, method, *a, **k: t.now + 0.075)
    slot = throttle.throttle_gpu_start("gpu1", 50, sleep=t.sleep, clock=t.clock)
    assert slot.waited_seconds == pytest.approx(0.075) and t.sleeps == [pytest.approx(0.075)]
    assert t.now >= slot.start  # never returns before the slot


def test_guard_task_without_gpu_only_sets_priority(monkeypatch):
    seen = []
    monkeypatch.setattr(worker, "apply_process_priority", lambda limits: seen.append(limits) or {"nice": 10})
    report = guard_task(NodeSpec(name="gpu1", mode="conservative"), 0, 0, probe=FakeProbe(gpu(1)))
    assert seen[0].node == "gpu1" and report.nice == 10
    assert report.vram is None and report.throttle_wait_seconds == 0.0


def test_guard_task_gpu_throttles_then_admits_then_exports(monkeypatch):
    order = []
    monkeypatch.setattr(worker, "apply_process_priority", lambda limits: order.append("priority") or {})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", raising=False)

    def throttle(node, interval_ms):
        order.append(("throttle", node, interval_ms))
        return ThrottleSlot(0.0, 0.02)

    probe = FakeProbe(gpu(1, 8))
    report = guard_task(NodeSpec(name="gpu1", mode="default"), 1, GIB, probe=probe, throttle=throttle)
    assert order == ["priority", ("throttle", "gpu1", 50.0)]
    assert report.vram.ok and report.throttle_wait_seconds == 0.02
    assert report.vram_cap["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=5734M"
    assert "waited 20 ms for a GPU slot" in report.describe()


def test_guard_task_gpu_over_cap_raises(monkeypatch):
    monkeypatch.setattr(worker, "apply_process_priority", lambda limits: {})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(VramCapExceeded, match="node 'gpu1'"):
        guard_task(
            NodeSpec(name="gpu1", mode="aggressive"), 1, 2 * GIB, probe=FakeProbe(gpu(9)), wait_seconds=0, throttle=lambda n, i: ThrottleSlot(0.0, 0.0)
        )


def _no_priority_no_throttle(monkeypatch):
    monkeypatch.setattr(worker, "apply_process_priority", lambda limits: {})
    # setenv first, so that what guard_task exports is removed again after the test.
    for key in ("CUDA_VISIBLE_DEVICES", guard.NEED_ENV, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "GRID_VRAM_CAP",
                "GRID_VRAM_LIMIT_BYTES"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return lambda n, i: ThrottleSlot(0.0, 0.0)


def test_guard_task_without_a_stated_need_admits_for_the_modes_default(monkeypatch):
    throttle = _no_priority_no_throttle(monkeypatch)
    node = NodeSpec(name="gpu1", mode="conservative")
    report = guard_task(node, 1, None, probe=FakeProbe(gpu(2)), throttle=throttle)
    assert report.vram.ok and report.vram.need_bytes == int(0.25 * 10 * GIB)
    assert os.environ[guard.NEED_ENV] == str(int(0.25 * 10 * GIB))
    with pytest.raises(VramCapExceeded, match="assumed needed .* over the conservative cap of 50%"):
        guard_task(node, 1, probe=FakeProbe(gpu(4)), wait_seconds=0, throttle=throttle)


def test_guard_task_stated_need_is_checked_and_exported(monkeypatch):
    throttle = _no_priority_no_throttle(monkeypatch)
    node = NodeSpec(name="gpu1", mode="conservative")  # cap 5 GiB of 10 GiB, 4 GiB used
    report = guard_task(node, 1, GIB, probe=FakeProbe(gpu(4)), throttle=throttle)
    assert report.vram.ok and os.environ[guard.NEED_ENV] == str(GIB)
    with pytest.raises(VramCapExceeded, match=r"4 GiB used \+ 2 GiB needed is over the conservative cap of 50%"):
        guard_task(node, 1, 2 * GIB, probe=FakeProbe(gpu(4)), wait_seconds=0, throttle=throttle)
    zero = guard_task(node, 1, 0, probe=FakeProbe(gpu(9)), throttle=throttle)  # vram=0: not checked
    assert zero.vram.ok and os.environ[guard.NEED_ENV] == "0"


# --------------------------------------------------------------------------- the probe a worker uses


class ProbeForEnv:
    status = "fake for GRID_GPU_PROBE"

    def devices(self):
        return gpu(3)


PROBE_INSTANCE = ProbeForEnv()
NOT_A_PROBE = 42


def make_probe():
    return ProbeForEnv()


def test_default_probe_is_nvml_without_the_variable(monkeypatch):
    monkeypatch.delenv(guard.PROBE_ENV, raising=False)
    assert isinstance(guard.default_probe(), NvmlProbe)
    monkeypatch.setenv(guard.PROBE_ENV, "  ")
    assert isinstance(guard.default_probe(), NvmlProbe)


@pytest.mark.parametrize("name", ["PROBE_INSTANCE", "ProbeForEnv", "make_probe"])
def test_default_probe_loads_the_named_probe(monkeypatch, name):
    monkeypatch.setenv(guard.PROBE_ENV, f"{__name__}:{name}")
    probe = guard.default_probe()
    assert isinstance(probe, ProbeForEnv) and probe.devices() == gpu(3)


@pytest.mark.parametrize(
    "value, message",
    [
        ("no_colon_here", "expected module:name"),
        (":probe", "expected module:name"),
        ("grid_flows.nowhere_to_be_found:probe", "cannot be loaded: No module named"),
        (f"{__name__}:missing", "cannot be loaded: module .* has no attribute 'missing'"),
        (f"{__name__}:NOT_A_PROBE", "is not a GPU probe"),
    ],
)
def test_default_probe_refuses_a_bad_name(monkeypatch, value, message):
    monkeypatch.setenv(guard.PROBE_ENV, value)
    with pytest.raises(GpuProbeError, match=message):
        guard.default_probe()


def test_guard_task_uses_the_probe_named_in_the_environment(monkeypatch):
    throttle = _no_priority_no_throttle(monkeypatch)
    monkeypatch.setenv(guard.PROBE_ENV, f"{__name__}:make_probe")
    report = guard_task(NodeSpec(name="gpu1", mode="default"), 1, GIB, throttle=throttle)
    assert report.vram.used_bytes == 3 * GIB and report.vram_cap["env"]["GRID_VRAM_CAP"] == "0.7"
