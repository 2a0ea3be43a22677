"""Long-context recall: accuracy per (context length, needle depth), single process or with CP.

    task = make_task("passkey", vocab_size=cfg.vocab_size, data_path=...)     # or "mqar"
    res = evaluate_recall(logits_fn, task, lengths=[1024, 2048], depths=[0, 0.5, 1], samples=8)
    res = evaluate_recall_cp(model, cp, task, lengths, depths)               # every rank of the CP group
    write_results(res, "run/recall")                 # run/recall.json and run/recall.png (heat map)

``logits_fn(input_ids [1, L], position_ids [1, L]) -> logits [1, L, V]`` is any single-process model.
Under context parallelism each rank calls ``model(input_ids_local [1, L/P], position_ids_local)``
(the :class:`~dist_attn.model.HybridLM` signature) on its shard in ``cp.layout`` (the sharding of
training, :func:`dist_attn.layout.shard`), then the logits of the answer positions only -- ``n`` rows
of V, wherever they live -- are summed over the CP group (each row is nonzero on exactly one rank, so
the sum is exact): ``n·V·4`` bytes per prompt instead of the ``L·V·4`` of gathering every logit.

Scoring is teacher-forced (one forward pass per prompt, answers appended, :mod:`dist_attn.eval.tasks`):
an item is recalled when every answer token is the argmax at the position before it, which is what
greedy decoding would produce token by token. Cell accuracy = recalled items / items over
``samples`` prompts; prompts are a pure function of (seed, L, sample), identical on every rank.

Data parallel replicas (``dp_size > 1``) split the samples (sample i on replica ``i % dp_size``) and
sum the counts over ``dp_group`` once at the end; the CP ranks of one replica share its samples.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dist_attn.eval.tasks import RecallPrompt, check_lengths
from dist_attn.layout import num_chunks, position_ids, shard

SCHEMA = "dist_attn.recall/1"
AnswerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_lengths(max_seq_len: int, start: int = 1024, stop: int = 65536) -> list[int]:
    """``start, 2·start, ...`` up to ``min(stop, max_seq_len)`` (1K..64K by default); ``[max_seq_len]``
    when even ``start`` does not fit."""
    top = min(stop, max_seq_len)
    out, n = [], start
    while n <= top:
        out.append(n)
        n *= 2
    return out or [max_seq_len]


@dataclass
class RecallResult:
    """Counts per cell: ``correct[i][j]`` / ``total[i][j]`` for ``lengths[i]``, ``depths[j]``."""
    task: dict
    lengths: list
    depths: list
    samples: int
    seed: int
    correct: list
    total: list
    meta: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict, repr=False)
    """(length, depth index, sample) -> argmax tokens [items, tokens] (this replica's samples; not saved)."""

    @property
    def accuracy(self) -> list:
        return [[c / t if t else float("nan") for c, t in zip(cr, tr)] for cr, tr in zip(self.correct, self.total)]

    def to_json(self) -> dict:
        by_len = [sum(c) / max(sum(t), 1) for c, t in zip(self.correct, self.total)]
        by_depth = [sum(col_c) / max(sum(col_t), 1) for col_c, col_t in zip(zip(*self.correct), zip(*self.total))]
        return dict(schema=SCHEMA, task=self.task, lengths=self.lengths, depths=self.depths, samples=self.samples,
                    seed=self.seed, accuracy=self.accuracy, correct=self.correct, total=self.total,
                    accuracy_by_length=by_len, accuracy_by_depth=by_depth,
                    mean_accuracy=sum(map(sum, self.correct)) / max(sum(map(sum, self.total)), 1),
                    chance=self.task.get("chance"), meta=self.meta)


def full_logits_answer_fn(logits_fn: Callable) -> AnswerFn:
    """Adapt ``logits_fn(ids [1, L], pos [1, L]) -> [1, L, V]`` to the answer-rows form."""
    @torch.no_grad()
    def fn(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return logits_fn(input_ids, pos)[0, positions].float().cpu()
    return fn


def cp_answer_fn(model: Callable, cp, device: Optional[torch.device] = None) -> AnswerFn:
    """The answer rows of a prompt evaluated by ``model`` on this CP rank's shard.

    ``cp``: anything with ``rank``, ``world_size``, ``layout`` and ``group`` (a
    :class:`~dist_attn.context.CPContext`). Collective over ``cp.group``: one all-reduce of
    ``[n, V]`` fp32 per prompt. Returns ``[n, V]`` fp32 on the CPU, the same on every CP rank.
    """
    rank, world, layout, group = cp.rank, cp.world_size, cp.layout, cp.group
    if device is None:
        params = getattr(model, "parameters", None)
        device = next(params()).device if params is not None else torch.device("cpu")

    @torch.no_grad()
    def fn(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        local_pos = position_ids(length, rank, world, layout)             # host, [L/P] global positions
        row_of = torch.full((length,), -1, dtype=torch.long)
        row_of[local_pos] = torch.arange(local_pos.numel())
        rows = row_of[positions]                                           # -1: on another rank
        mine = (rows >= 0).nonzero().squeeze(1)
        ids = shard(input_ids, rank, world, layout, dim=1).to(device)
        logits = model(ids, local_pos.unsqueeze(0).to(device))             # [1, L/P, V]
        out = torch.zeros(positions.numel(), logits.shape[-1], dtype=torch.float32, device=logits.device)
        out[mine.to(out.device)] = logits[0, rows[mine].to(logits.device)].float()
        if world > 1:
            dist.all_reduce(out, group=group)                              # one owner per row: exact
        return out.cpu()
    return fn


def score(prompt: RecallPrompt, answer_logits: torch.Tensor) -> tuple[int, np.ndarray]:
    """``answer_logits [n, V]`` for ``prompt.answer_pos.ravel()`` -> (recalled items, argmax [items, tokens])."""
    pred = answer_logits.argmax(-1).numpy().reshape(prompt.answer_pos.shape)
    return int((pred == prompt.answer_ids).all(axis=1).sum()), pred


def run_recall(answer_fn: AnswerFn, task, lengths: Sequence[int], depths: Sequence[float], *, samples: int = 4,
               seed: int = 0, max_len: int = 1 << 62, chunks: int = 1, dp_rank: int = 0, dp_size: int = 1,
               dp_group=None, device=None, progress: bool = False, meta: Optional[dict] = None) -> RecallResult:
    """The evaluation loop over lengths x depths x samples with any :data:`AnswerFn`."""
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    check_lengths(task, lengths, depths, max_len, chunks)
    if samples < 1:
        from dist_attn.checks import fail
        fail("recall samples", "a positive int", samples, "use e.g. 8 prompts per cell")
    counts = torch.zeros(len(lengths), len(depths), 2, dtype=torch.float64)
    preds = {}
    mine = [i for i in range(samples) if i % dp_size == dp_rank]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(lengths) * len(depths) * len(mine), desc="recall", unit="prompt", dynamic_ncols=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                for s in mine:
                    p = task.prompt(length, depth, seed, s)
                    assert len(p.input_ids) == length, (len(p.input_ids), length)
                    logits = answer_fn(torch.from_numpy(p.input_ids).unsqueeze(0),
                                       torch.from_numpy(p.answer_pos.reshape(-1)))
                    hit, preds[(length, j, s)] = score(p, logits)
                    counts[i, j] += torch.tensor([hit, p.answer_pos.shape[0]], dtype=torch.float64)
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    if dp_size > 1:
        c = counts.to(device or "cpu")
        dist.all_reduce(c, group=dp_group)
        counts = c.cpu()
    info = dict(elapsed_s=round(time.perf_counter() - t0, 3), **(meta or {}))
    return RecallResult(task.describe(), lengths, depths, samples, seed,
                        counts[..., 0].long().tolist(), counts[..., 1].long().tolist(), info, preds)


def evaluate_recall(logits_fn: Callable, task, lengths: Sequence[int], depths: Sequence[float], **kw) -> RecallResult:
    """Single process: ``logits_fn(input_ids [1, L], position_ids [1, L]) -> logits [1, L, V]``."""
    return run_recall(full_logits_answer_fn(logits_fn), task, lengths, depths, **kw)


def evaluate_recall_cp(model: Callable, cp, task, lengths: Sequence[int], depths: Sequence[float], *,
                       max_len: Optional[int] = None, device=None, **kw) -> RecallResult:
    """Every rank of the CP group (collective): ``model(ids_local, pos_local) -> logits_local``; lengths
    must split in ``cp.layout`` over ``cp.world_size`` ranks (checked before any collective).
    ``max_len`` defaults to ``model.cfg.max_seq_len`` when the model has one."""
    if max_len is None:
        max_len = getattr(getattr(model, "cfg", None), "max_seq_len", 1 << 62)
    meta = dict(cp=cp.world_size, layout=cp.layout, **kw.pop("meta", {}))
    return run_recall(cp_answer_fn(model, cp, device), task, lengths, depths, max_len=max_len,
                      chunks=num_chunks(cp.world_size, cp.layout), device=device, meta=meta, **kw)


def write_results(result: RecallResult, prefix: str, png: bool = True) -> dict:
    """``PREFIX.json`` (always) and ``PREFIX.png`` (heat map, when ``png`` and matplotlib is there).
    Returns ``{"json": path, "png": path or None}``; the JSON is written atomically."""
    from dist_attn.eval.plot import plot_heatmap
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    path = prefix + ".json"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result.to_json(), f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)
    return {"json": path, "png": plot_heatmap(result.to_json(), prefix + ".png") if png else None}


def format_table(res: dict) -> str:
    """A markdown table of a result JSON: one row per length, one column per depth."""
    head = "| length | " + " | ".join(f"d={d:g}" for d in res["depths"]) + " | mean |"
    rows = [head, "|" + "---|" * (len(res["depths"]) + 2)]
    for n, acc, m in zip(res["lengths"], res["accuracy"], res["accuracy_by_length"]):
        cells = " | ".join("-" if math.isnan(a) else f"{a:.2f}" for a in acc)
        rows.append(f"| {n} | {cells} | {m:.2f} |")
    return "\n".join(rows)
