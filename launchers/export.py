"""Export a training checkpoint as a model directory (``config.json`` + ``model.safetensors`` + tokenizer).

    python -m launchers.export --run outputs/2026-01-01_12-00-00 --out model/        # its newest checkpoint
    python -m launchers.export --checkpoint outputs/RUN/checkpoints/step_00000400 --out model/
    python -m launchers.generate --model model/ --prompt "Hello" --max-new-tokens 32

Any layout the trainer saved: DeepSpeed (ZeRO 0-3 partitions over DP x CP, pipeline stages) or megatron
(TP/PP/VPP shards, distributed optimizer), reassembled in this one process; the result loads with
``HybridLM.from_pretrained`` without an engine or a process group. The tokenizer is the one recorded
beside the training token file (``--tokenizer byte|PATH|none`` overrides). Errors print one line
``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launchers.export", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: its newest complete checkpoint")
    src.add_argument("--checkpoint", help="a checkpoints/step_N directory (or a checkpoints/ directory)")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--tokenizer", default="auto", help="auto (from the training data) | byte | none | PATH")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cast the weights (default: as stored: fp32 masters for ZeRO >= 1)")
    a = ap.parse_args(argv)
    import torch
    from dist_attn.train.checkpoint import export_checkpoint
    tok = None if a.tokenizer == "none" else a.tokenizer
    try:
        out = export_checkpoint(a.run or a.checkpoint, a.out, tokenizer=tok,
                                dtype=getattr(torch, a.dtype) if a.dtype else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
