"""Atomic checkpoints and resume.

The heavy state (model, optimizer incl. ZeRO partitions, LR schedule) is written by the backend's
own ``save``/``load`` (DeepSpeed ``save_checkpoint``/``load_checkpoint``). This module adds what
makes a checkpoint *complete or ignored*::

    checkpoints/.tmp-step_00000100/   every rank writes here (backend files, rng_rank<r>.pt)
    checkpoints/step_00000100/        rank 0 renames the temp dir after a barrier: the commit
        COMPLETE                      written before the rename; trainer_state.json beside it

A directory named ``step_*`` therefore exists only once every rank has finished writing; a crash
leaves a ``.tmp-*`` directory that is never loaded and is removed by the next run. Deleting works the
other way round: a checkpoint is first renamed to ``.trash-*`` (atomic), then removed, so a crash in
the middle of a deletion never leaves a half-deleted ``step_*`` that still holds its marker. The
checkpoint directory must be on a file system every rank sees (as DeepSpeed assumes).

The data position is the step: every batch is a function of (seed, step), so nothing else about
the data stream needs saving. RNG states (python, numpy, torch CPU and CUDA) are saved per rank.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"
STATE = "trainer_state.json"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def is_complete(path: str) -> bool:
    return os.path.basename(path.rstrip("/")).startswith("step_") and os.path.isfile(os.path.join(path, MARKER))


def _discard(path: str) -> None:
    """Remove a checkpoint directory so that no crash leaves a loadable part of it: rename, then delete."""
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root`` (a checkpoints/ directory), oldest step first."""
    return sorted(p for p in glob.glob(os.path.join(root, "step_*")) if is_complete(p))


def _experiment_of(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, STATE)) as f:
            return json.load(f).get("experiment")
    except (OSError, ValueError):
        return None


def find_resume(resume: Optional[str], out_dir: str, run_dir: str,
                experiment: Optional[dict] = None) -> Optional[str]:
    """The checkpoint to load for ``trainer.resume``: None, 'auto' or a path.

    'auto': the newest complete checkpoint of this run directory, else the most recently committed
    one of another run under ``out_dir`` *of the same experiment* (model, data, seed and parallel layout
    equal to ``experiment``, when given); None if there is none (a fresh start). A path may name a
    ``step_*`` checkpoint, a ``checkpoints/`` directory or a run directory (its newest checkpoint).
    """
    if not resume:
        return None
    if resume == "auto":
        own = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
        if own:
            return own[-1]
        every = glob.glob(os.path.join(out_dir, "*", "checkpoints", "step_*"))
        every = [p for p in every if is_complete(p) and (experiment is None or _experiment_of(p) == experiment)]
        return max(every, key=lambda p: os.path.getmtime(os.path.join(p, MARKER))) if every else None
    if is_complete(resume):
        return resume
    for root in (resume, os.path.join(resume, "checkpoints")):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise ValueError(f"trainer.resume: expected a complete checkpoint (a step_* directory holding {MARKER}) "
                     f"or a directory containing some, got {resume!r}. Fix: point it at <run>/checkpoints/"
                     f"step_N, at the run directory, or use trainer.resume=auto.")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save and load through ``backend`` (an object with collective ``save(path, client_state)`` and
    ``load(path) -> client_state``). ``layout`` (sizes that change the saved partitioning) is stored
    and compared on load."""

    def __init__(self, run_dir: str, backend, layout: dict, keep: int = 2, experiment: Optional[dict] = None):
        self.root = os.path.join(run_dir, "checkpoints")
        self.backend, self.layout, self.keep, self.experiment = backend, layout, keep, experiment
        self.rank = dist.get_rank()
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in glob.glob(os.path.join(self.root, ".tmp-step_*")) + \
                    glob.glob(os.path.join(self.root, ".trash-step_*")):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted save or deletion: never loaded
        dist.barrier()

    def save(self, step: int, extra: dict | None = None) -> str:
        """Collective. Returns the committed directory."""
        final = step_dir(self.root, step)
        tmp = os.path.join(self.root, f".tmp-{os.path.basename(final)}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        self.backend.save(tmp, {"step": step})
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(dict(step=step, layout=self.layout, experiment=self.experiment, **(extra or {})), f,
                          indent=1)
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # the same step saved again (e.g. after a resume): replace it
                _discard(final)
            os.rename(tmp, final)  # the commit: atomic on a POSIX file system
            for old in complete_checkpoints(self.root)[:-self.keep]:
                _discard(old)
        dist.barrier()
        return final

    def load(self, path: str) -> int:
        """Collective. Restores the backend state and this rank's RNG; returns the step to continue at."""
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
        if state.get("layout") != self.layout:
            raise ValueError(f"checkpoint {path}: expected a checkpoint written with {self.layout}, got "
                             f"{state.get('layout')}. Fix: resume with the same parallel sizes, ZeRO stage "
                             f"and model, or start a fresh run (trainer.resume=null).")
        client = self.backend.load(path)
        step = int(client.get("step", state["step"]))
        rng = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):
            set_rng_state(torch.load(rng, weights_only=False))
        return step


def export_checkpoint(checkpoint: str, out_dir: str, *, tokenizer="auto", dtype: Optional[torch.dtype] = None) -> str:
    """Turn a training checkpoint into a model directory (:mod:`dist_attn.model.io`), in one process.

    ``checkpoint``: a ``step_*`` directory, a ``checkpoints/`` directory or a run directory (its newest
    complete checkpoint). The model config and the engine come from its ``trainer_state.json``; the
    engine's ``export_state_dict`` reassembles the weights from whatever layout it saved (DeepSpeed
    ZeRO partitions or pipeline layers; megatron TP/PP shards). ``tokenizer``: ``"auto"`` takes the
    one recorded beside the training token file (``data=memmap``; none for MQAR), else as
    :func:`dist_attn.model.io.tokenizer_info`. Returns ``out_dir``."""
    import importlib
    from dist_attn.checks import fail
    from dist_attn.engines import ENGINES
    from dist_attn.model.config import ModelConfig
    from dist_attn.model.io import save_state_dict
    if not checkpoint or not os.path.isdir(checkpoint):
        fail("export", "a checkpoint, checkpoints/ or run directory", repr(checkpoint), "check the path")
    try:
        path = find_resume(checkpoint, "", "")
    except ValueError:
        fail("export", f"a complete checkpoint (a step_* directory holding {MARKER}) or a directory containing "
             "some", repr(checkpoint), "point at <run>/checkpoints/step_N or at the run directory")
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    layout = state.get("layout") or {}
    if layout.get("backend") not in ENGINES or not isinstance(layout.get("model"), dict):
        fail(f"export {path}", f"a {STATE} naming the backend and model", f"layout {layout}",
             "export a checkpoint written by this project's trainer")
    cfg = ModelConfig(**layout["model"])
    sd = importlib.import_module(ENGINES[layout["backend"]][0]).export_state_dict(path, cfg, layout)
    if tokenizer == "auto":
        tokenizer = None
        data = (state.get("experiment") or {}).get("data") or {}
        if data.get("name") == "memmap" and data.get("path"):
            from dist_attn.data.memmap import read_meta
            tokenizer = read_meta(data["path"])
    source = {"checkpoint": os.path.abspath(path), "step": state.get("step"), "backend": layout["backend"],
              "layout": {k: layout.get(k) for k in ("dp", "tp", "cp", "pp", "vpp", "zero_stage")}}
    return save_state_dict(out_dir, sd, cfg, tokenizer=tokenizer, dtype=dtype, source=source)
