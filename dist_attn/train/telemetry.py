"""Training telemetry: ``metrics.jsonl`` + TensorBoard scalars on rank 0, GPU counters per rank.

One JSON object per logged step in ``<run dir>/metrics.jsonl``; the same numbers as TensorBoard
scalars in ``<run dir>/tb``. Keys (see :data:`METRIC_KEYS`): step, loss, recall_acc (MQAR; null for
other data), lr, grad_norm (before clipping), tokens_per_s (global), step_time_s, mfu, comm bytes of
the CP attention collectives on rank 0 (from :class:`dist_attn.comm.CommRecorder`), memory
(``mem_gb`` now, ``mem_peak_gb`` since the process started, ``peak_mem_mb``: the highest per-step
peak of this rank since the last logged row -- the step's own peak with ``log_every=1`` -- from the
CUDA allocator's ``max_memory_allocated``, reset at every step, or on CPU the process's peak RSS,
reset at every step through ``/proc/self/clear_refs``; where that is not writable, the process peak), and
``gpus`` (utilization, memory, power, temperature of every rank's GPU) when NVML is present.

MFU = flops_per_token(S) x global tokens/s / (peak FLOP/s per device x devices), with the FLOP
convention of :meth:`dist_attn.model.config.ModelConfig.flops_per_token` (6N + attention, causal
halving applied). The peak comes from ``trainer.peak_tflops``, else a table of dense bf16 peaks by
GPU name; on CPU it is a rough per-process guess and ``mfu_is_estimate`` is true.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("dist_attn.train")

METRIC_KEYS = ("step", "loss", "recall_acc", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
               "mfu_is_estimate", "comm_sent_bytes", "comm_recv_bytes", "comm_by_kind", "mem_gb",
               "mem_peak_gb", "peak_mem_mb")

# dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, SXM parts where there are two)
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0,
                   "B200": 2250.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}
# one CPU process, one thread: 2 FMA units x 8 fp32 lanes (AVX2) x 2 FLOP x ~3 GHz ~ 0.1 TFLOP/s
CPU_PEAK_TFLOPS_PER_THREAD = 0.1


def peak_flops(configured_tflops: Optional[float], device: torch.device) -> tuple[float, bool]:
    """Peak FLOP/s of one device and whether it is an estimate."""
    if configured_tflops:
        return configured_tflops * 1e12, False
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, False
        log.warning("no peak FLOP/s known for %s; MFU uses the H100 peak (set trainer.peak_tflops)", name)
        return GPU_PEAK_TFLOPS["H100"] * 1e12, True
    return CPU_PEAK_TFLOPS_PER_THREAD * 1e12 * torch.get_num_threads(), True


class _Nvml:
    """This rank's GPU counters through nvidia-ml-py, or nothing (with one notice on rank 0)."""

    def __init__(self, device: torch.device, rank: int):
        self.handle, self.nvml = None, None
        reason = "no CUDA device" if device.type != "cuda" else ""
        if not reason:
            try:
                import pynvml
                pynvml.nvmlInit()
                # NVML numbers GPUs physically; map through CUDA_VISIBLE_DEVICES when it is set
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                index = device.index if device.index is not None else torch.cuda.current_device()
                if visible:
                    index = int(visible.split(",")[index])
                self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(index), pynvml
            except Exception as e:  # NVML missing or too old: telemetry goes on without it
                reason = f"NVML unavailable ({type(e).__name__}: {e})"
        if reason and rank == 0:
            log.warning("GPU telemetry off: %s; utilization, power and temperature are not logged.", reason)

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        out = {}
        for key, fn in (("util_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                        ("mem_used_gb", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**30),
                        ("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0),
                        ("temp_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))):
            try:
                out[key] = float(fn())
            except Exception:  # a counter the device does not expose
                pass
        return out


def memory_gb(device: torch.device) -> tuple[float, float]:
    """(current, peak) memory of this rank: CUDA allocator on GPU, process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    try:
        import psutil  # a DeepSpeed dependency
        rss = psutil.Process().memory_info().rss / 2**30
    except ImportError:
        rss = peak
    return rss, max(rss, peak)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window: the CUDA allocator's peak, or on CPU the kernel's peak RSS
    (VmHWM, ``echo 5 > /proc/self/clear_refs``). False where the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank since :func:`reset_peak_memory` (MiB): CUDA ``max_memory_allocated``,
    or on CPU the peak RSS (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Telemetry:
    """Collective ``log`` (every rank calls it at the same steps); rank 0 writes the files."""

    def __init__(self, run_dir: str, device: torch.device, *, tensorboard: bool = True,
                 peak_tflops: Optional[float] = None):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device, self.run_dir = device, run_dir
        self.peak, self.peak_is_estimate = peak_flops(peak_tflops, device)
        self.nvml = _Nvml(device, self.rank)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tb")
        self._file, self._tb = None, None
        self._window_peak_mb = 0.0
        if self.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.metrics_path, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(self.tb_dir)

    def mfu(self, flops_per_token: float, tokens_per_s: float) -> float:
        return flops_per_token * tokens_per_s / (self.peak * self.world_size)

    def step_begin(self) -> None:
        """Call before each training step: starts the step's peak-memory window."""
        reset_peak_memory(self.device)

    def step_end(self) -> float:
        """Call after each training step: this step's peak memory (MiB), kept for the next log row."""
        peak = peak_memory_mb(self.device)
        self._window_peak_mb = max(self._window_peak_mb, peak)
        return peak

    def log(self, record: dict) -> dict:
        """Add memory and GPU counters to ``record`` and write it (rank 0). Returns the full record."""
        mem, peak = memory_gb(self.device)
        step_peak = self._window_peak_mb or peak_memory_mb(self.device)
        self._window_peak_mb = 0.0
        record = dict(record, mem_gb=round(mem, 4), mem_peak_gb=round(peak, 4), peak_mem_mb=round(step_peak, 2),
                      mfu_is_estimate=self.peak_is_estimate)
        gpu = self.nvml.read()
        if self.nvml.handle is not None and self.world_size > 1:
            every: list = [None] * self.world_size
            dist.all_gather_object(every, gpu)
            record["gpus"] = every
        elif gpu:
            record["gpus"] = [gpu]
        if self.rank == 0:
            self._file.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._scalars(record)
        return record

    def _scalars(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)
            elif key == "comm_by_kind":
                for kind, b in value.items():
                    self._tb.add_scalar(f"comm/{kind}_sent_bytes", b, step)
            elif key == "gpus":
                for r, g in enumerate(value):
                    for k, v in (g or {}).items():
                        self._tb.add_scalar(f"gpu{r}/{k}", v, step)

    def rewind(self, step: int) -> None:
        """After resuming at ``step``: drop the rows and tensorboard events of later steps that a failed
        attempt logged, so every step appears once (rank 0; the file is replaced atomically)."""
        if self.rank != 0:
            return
        self._file.close()
        with open(self.metrics_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics_path)
        self._file = open(self.metrics_path, "a", buffering=1)
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb.close()
            self._tb = SummaryWriter(self.tb_dir, purge_step=step + 1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
