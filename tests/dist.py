"""The one process-spawning harness of the repository (tests and benchmarks): run a function on
several gloo CPU processes and bring every rank's result or error back.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, rendezvouses them in a
gloo process group (file store, ``pg_timeout`` on every collective), calls ``fn(rank, world_size,
*args)`` and returns the list of return values. Exceptions are re-raised in the parent with the
failing rank and its traceback; a child that dies without reporting (segfault, OOM kill) is an error
too; a job that does not finish within ``timeout`` seconds (None: no limit) is killed and reported
as a hang (``DistributedHang``). ``fn`` must be a module-level function (spawn pickles it by name).
Keep return values small. ``benchmarks/common.py`` launches its spawned runs through it.
"""
from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch.multiprocessing as mp


class DistributedHang(AssertionError):
    pass


@dataclass
class RankError:
    rank: int
    type_name: str
    message: str
    traceback: str


def _worker(fn, rank, world_size, init_file, pg_timeout, args, results, threads=1):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException as e:  # noqa: BLE001 - every error goes back to the parent
        results.put((rank, "err", RankError(rank, type(e).__name__, str(e), traceback.format_exc())))


def run_distributed(fn, world_size: int, *args, timeout: float | None = 300.0, pg_timeout: float = 60.0,
                    raise_errors: bool = True, threads: int = 1):
    """Returns ``[result_rank0, ...]``; with ``raise_errors=False`` a failed rank's entry is a RankError.
    ``threads``: torch intra-op threads per process (1: tests share the cores)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, pg_timeout, args, results, threads),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
                got[rank] = (status, payload)
            except queue_mod.Empty:
                # a process that died without reporting (segfault, OOM kill) is an error too
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got
                        and p.exitcode not in (0, None)]
                if dead and results.empty():
                    for r in dead:
                        got[r] = ("err", RankError(r, "ProcessDied", f"exit code {procs[r].exitcode}", ""))
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(world_size) if r not in got]
    if missing:
        raise DistributedHang(f"ranks {missing} did not finish within {timeout}s (hang?)")
    out = []
    for r in range(world_size):
        status, payload = got[r]
        if status == "err" and raise_errors:
            raise AssertionError(f"rank {r} raised {payload.type_name}: {payload.message}\n{payload.traceback}")
        out.append(payload)
    return out
