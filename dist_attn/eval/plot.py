"""The recall heat map: accuracy per (context length, needle depth) from a result JSON.

x: context length (one column per length), y: needle depth (0 = start of the context, at the top),
colour: accuracy in [0, 1], each cell annotated. matplotlib (the ``dev`` extra) draws it with the Agg
backend (no display); without matplotlib the PNG is skipped with a warning and the JSON stands alone.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("dist_attn.eval")

MISSING = ("matplotlib is not installed: skipped the recall heat map {path} (the JSON has the numbers). "
           "Fix: pip install matplotlib (or the dev extra: pip install -e '.[dev]').")


def _label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_heatmap(res: dict, path: str) -> Optional[str]:
    """Write the heat map of result JSON ``res`` to ``path``; returns ``path``, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(MISSING.format(path=path))
        return None
    import numpy as np
    acc = np.array(res["accuracy"], dtype=float).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.8 * acc.shape[1]), 1.4 + 0.45 * acc.shape[0]), dpi=110)
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [_label(n) for n in res["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:g}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (y, x), a in np.ndenumerate(acc):
        ax.text(x, y, "-" if np.isnan(a) else f"{a:.2f}", ha="center", va="center", fontsize=8)
    task = res["task"]
    chance = task.get("chance")
    extra = f", chance {chance:.2g}" if chance else ""
    ax.set_title(f"recall: {task['name']} ({res['samples']} prompts/cell{extra})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
