"""The one process-spawning harness of the repository (tests and benchmarks): run a function on
several gloo CPU processes and bring every rank's result or error back.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, rendezvouses them in a
gloo process group (file store, ``pg_timeout`` on every collective), calls ``fn(rank, world_size,
*args)`` and returns the list of return values. Exceptions are re-raised in the parent with the
failing rank and its traceback; a child that dies without reporting (segfault, OOM kill) is an error
too; a job that does not finish within ``timeout`` seconds (None: no limit) is killed and reported
as a hang (``DistributedHang``). ``fn`` must be a module-level function (spawn pickles it by name).
Keep return values small. ``benchmarks/common.py`` launches its spawned runs through it.

``reuse=True`` runs ``fn`` on a pool of ``world_size`` processes kept alive between calls (one pool
per (world size, threads)), with a new gloo process group per call and torch's default RNG reset to
a fresh process's seed: a launch then costs a rendezvous (~0.1 s) instead of spawning and importing
torch in every rank (2-4 s on 2 cores). Only for functions whose ranks leave no global state behind
(the strategy, kernel and model tests); the engines (DeepSpeed, megatron-core) keep module-global
state and run in fresh processes. A pool whose call times out or whose process dies is killed, and
the next call starts a new one.
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

    torch.set_num_threads(threads)
    try:
        results.put((rank, "ok", _run(fn, rank, world_size, init_file, pg_timeout, args)))
    except BaseException as e:  # noqa: BLE001 - every error goes back to the parent
        results.put((rank, "err", RankError(rank, type(e).__name__, str(e), traceback.format_exc())))


def _run(fn, rank, world_size, init_file, pg_timeout, args):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _pool_worker(rank, world_size, tasks, results, threads):
    """Serve jobs ``(seq, fn, init_file, pg_timeout, args)`` until ``None``; each gets a new group."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    while True:
        job = tasks.get()
        if job is None:
            return
        seq, fn, init_file, pg_timeout, args = job
        torch.manual_seed(torch.initial_seed())  # the default generator of a fresh process
        try:
            results.put((seq, rank, "ok", _run(fn, rank, world_size, init_file, pg_timeout, args)))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the parent
            results.put((seq, rank, "err", RankError(rank, type(e).__name__, str(e), traceback.format_exc())))


class _Pool:
    def __init__(self, world_size: int, threads: int):
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_pool_worker, args=(r, world_size, self.tasks[r], self.results, threads),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.seq = 0

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


_POOLS: dict = {}


def _run_pooled(fn, world_size, args, timeout, pg_timeout, threads) -> dict:
    key = (world_size, threads)
    pool = _POOLS.get(key)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[key] = _Pool(world_size, threads)
    pool.seq += 1
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        for q in pool.tasks:
            q.put((pool.seq, fn, init_file, pg_timeout, args))
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while len(got) < world_size and time.monotonic() < deadline:
            try:
                seq, rank, status, payload = pool.results.get(timeout=min(deadline - time.monotonic(), 1.0))
            except (queue_mod.Empty, ValueError):
                dead = [r for r, p in enumerate(pool.procs) if not p.is_alive() and r not in got]
                for r in dead:
                    got[r] = ("err", RankError(r, "ProcessDied", f"exit code {pool.procs[r].exitcode}", ""))
                continue
            if seq == pool.seq:
                got[rank] = (status, payload)
    if len(got) < world_size or any(s == "err" and p.type_name == "ProcessDied" for s, p in got.values()):
        pool.close()                                     # hung or broken: never reuse it
        _POOLS.pop(key, None)
    return got


def run_distributed(fn, world_size: int, *args, timeout: float | None = 300.0, pg_timeout: float = 60.0,
                    raise_errors: bool = True, threads: int = 1, reuse: bool = False):
    """Returns ``[result_rank0, ...]``; with ``raise_errors=False`` a failed rank's entry is a RankError.
    ``threads``: torch intra-op threads per process (1: tests share the cores). ``reuse``: run on the
    persistent process pool (see the module docstring)."""
    if reuse:
        return _collect(_run_pooled(fn, world_size, args, timeout, pg_timeout, threads), world_size, timeout,
                        raise_errors)
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
    return _collect(got, world_size, timeout, raise_errors)


def _collect(got: dict, world_size: int, timeout, raise_errors: bool) -> list:
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
