"""Sample from a saved model (``HybridLM.save_pretrained`` / ``python -m launchers.export``).

    python -m launchers.generate --model out/model --prompt "Once upon a time" --max-new-tokens 64
    python -m launchers.generate --model out/model --prompt-ids "1 2 3" --max-new-tokens 8 --greedy
    python -m launchers.generate --model out/model --prompt "Hi" --temperature 0.8 --top-p 0.9 --seed 1

Prints the decoded continuation (the model directory's tokenizer: byte level or its tokenizer.json;
none recorded: the ids only) and, on its LAST line, the generated token ids separated by spaces.
Decoding is incremental (:mod:`dist_attn.model.generate`); it stops early at the tokenizer's EOS
unless ``--ignore-eos``. Errors (a missing or broken model directory, bad arguments) print one line
``error: ...`` on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launchers.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the model's tokenizer)")
    src.add_argument("--prompt-ids", help='prompt token ids separated by spaces, e.g. "1 2 3"')
    ap.add_argument("--max-new-tokens", type=int, default=32)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    mode.add_argument("--temperature", type=float, default=None, help="sample from softmax(logits / T)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-document id")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    import torch
    from dist_attn.model.generate import generate
    from dist_attn.model.hybrid import HybridLM
    from dist_attn.model.io import load_tokenizer
    try:
        if a.top_p != 1.0 and a.temperature is None:
            raise ValueError(f"launchers.generate: expected --top-p together with --temperature, got --top-p "
                             f"{a.top_p} alone. Fix: add --temperature 1.0 (or drop --top-p for greedy decoding).")
        model = HybridLM.from_pretrained(a.model, device=a.device, dtype=getattr(torch, a.dtype))
        tok = load_tokenizer(a.model)
        if a.prompt is not None:
            if tok is None:
                raise ValueError(f"launchers.generate: expected a tokenizer in {a.model}/config.json to encode "
                                 f"--prompt, got none. Fix: pass --prompt-ids, or export the model with its tokenizer.")
            ids = tok.encode(a.prompt)
        else:
            try:
                ids = [int(t) for t in a.prompt_ids.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"launchers.generate: expected --prompt-ids as integers separated by spaces, "
                                 f"got {a.prompt_ids!r}. Fix: e.g. --prompt-ids \"1 2 3\".") from None
        if not ids:
            raise ValueError("launchers.generate: expected a non-empty prompt, got none. Fix: pass some text "
                             "or ids.")
        eos = None if a.ignore_eos or tok is None else tok.eos_id
        new = generate(model, [ids], a.max_new_tokens, greedy=a.temperature is None,
                       temperature=a.temperature or 1.0, top_p=a.top_p, seed=a.seed, eos_id=eos)[0].tolist()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok is not None:
        print(tok.decode(new))
    print(" ".join(str(i) for i in new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
