"""Incremental decoding, model files and the generate CLI (dist_attn.model.generate / io, launchers.generate).

References: the model's own full forward, in fp64 (the same weights cast), which shares no code with
the decode path's recurrences (linear state update, KV-cache attention). Tiny models, < 10 s in all.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dist_attn.model import HybridLM, ModelConfig
from dist_attn.model.generate import DecodeCache, generate, greedy_by_full_forward, prefill, step
from dist_attn.model.io import load_tokenizer
from tests.utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(pattern="LF", seed=0, **kw) -> HybridLM:
    torch.manual_seed(seed)
    args = dict(vocab_size=61, d_model=32, n_layers=len(pattern), n_heads=4, n_kv_heads=2, pattern=pattern,
                max_seq_len=256)
    args.update(kw)
    return HybridLM(ModelConfig(**args)).eval()


def _patterns() -> list:
    """Every layer type the model knows, alone and mixed with softmax attention."""
    kinds = [k for k in HybridLM.MIXERS if k != "F"]
    return ["F", "LF", "FLLF"] + [k for k in kinds if k != "L"] + [k + "F" + k for k in kinds if k != "L"]


@pytest.mark.parametrize("pattern", _patterns() + ["LF-window5", "F-window0"])
def test_incremental_logits_equal_full_forward(pattern):
    """Prefill S0 tokens then step, and step every token from an empty cache: logits at every position
    equal the full forward's, fp32 (vs the fp64 forward, fp32 tolerances) and fp64 (to ~1e-15; G and D
    layers compute their gate in fp32 by design, so their fp64 models are fp32-exact only). ``-windowW``:
    softmax layers with a sliding window of W (the cache is read from position - W on)."""
    pattern, _, window = pattern.partition("-window")
    model = _model(pattern, window_size=int(window) if window else None)
    ids = torch.randint(0, 61, (2, 45))
    pos = torch.arange(45)
    fp64 = dict(scale=1e-6) if set(pattern) <= {"L", "F"} else dict(dtype=torch.float32)
    with torch.no_grad():
        ref = model.double()(ids, pos)
        for dtype, check in ((torch.float64, lambda n, r, o: assert_close(n, r, o, **fp64)),
                             (torch.float32, lambda n, r, o: assert_close(n, r, o, dtype=torch.float32))):
            model = model.to(dtype)
            logits, cache = prefill(model, ids[:, :29])
            check(f"{pattern} {dtype} prefill", ref[:, :29], logits)
            assert cache.length == 29
            steps = torch.stack([step(model, ids[:, t], cache) for t in range(29, 45)], dim=1)
            check(f"{pattern} {dtype} steps after prefill", ref[:, 29:], steps)
            fresh = DecodeCache()
            steps = torch.stack([step(model, ids[:, t], fresh) for t in range(45)], dim=1)
            check(f"{pattern} {dtype} steps from empty", ref, steps)


def test_prefill_is_the_training_forward_exactly():
    """Same kernels as HybridLM.forward: the prefill logits are bit-identical (GQA, tied, ungated)."""
    for kw in ({}, dict(tie_embeddings=True, gated_attention=False, n_kv_heads=1)):
        model = _model("LFLF", **kw)
        ids = torch.randint(0, 61, (3, 70))
        with torch.no_grad():
            assert torch.equal(prefill(model, ids)[0], model(ids, torch.arange(70)))


def test_greedy_decoding_equals_repeated_full_forward():
    model = _model("LLFL", seed=1)
    ids = torch.randint(0, 61, (2, 7))
    got = generate(model, ids, 40)
    assert got.shape == (2, 40)
    assert torch.equal(got, greedy_by_full_forward(model, ids, 40))
    assert torch.equal(model.generate(ids[0].tolist(), 5), got[:1, :5])  # one prompt as a list


def test_sampling_is_deterministic_with_a_seed_and_top_p_narrows_to_argmax():
    model = _model("LF")
    ids = torch.randint(0, 61, (2, 5))
    a = generate(model, ids, 20, greedy=False, temperature=1.5, top_p=0.9, seed=3)
    b = generate(model, ids, 20, greedy=False, temperature=1.5, top_p=0.9, seed=3)
    c = generate(model, ids, 20, greedy=False, temperature=1.5, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.flatten().tolist())) > 5  # a high temperature spreads the draws
    # a nucleus holding only the most likely token is greedy decoding
    assert torch.equal(generate(model, ids, 20, greedy=False, top_p=1e-6, seed=5), generate(model, ids, 20))


def test_eos_stops_decoding():
    model = _model("LF")
    ids = torch.randint(0, 61, (1, 5))
    free = generate(model, ids, 12)
    eos = int(free[0, 3])
    first = free[0].tolist().index(eos)
    stopped = generate(model, ids, 12, eos_id=eos)
    assert stopped[0].tolist() == free[0, :first + 1].tolist()


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, tie):
    model = _model("LFLL", tie_embeddings=tie)
    model.save_pretrained(str(tmp_path), tokenizer="byte")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = HybridLM.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 61, (2, 33))
    with torch.no_grad():
        assert torch.equal(model(ids, torch.arange(33)), loaded(ids, torch.arange(33)))
    assert (loaded.head.out.weight is loaded.embed.tok.weight) == tie
    assert loaded.cfg == model.cfg and not loaded.training
    half = HybridLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.embed.tok.weight.dtype == torch.bfloat16
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id == 256 and tok.decode(tok.encode("héllo") + [256]) == "héllo"


def test_tokenizer_json_is_copied_beside_the_weights(tmp_path):
    from dist_attn.data.tokenize import train_bpe
    tok = train_bpe(["the cat sat on the mat " * 20, "a dog and a cat"] * 5, 300)
    src = tmp_path / "tok.json"
    tok.save(str(src))
    model = _model("LF", vocab_size=300)
    model.save_pretrained(str(tmp_path / "m"), tokenizer=str(src))
    loaded = load_tokenizer(str(tmp_path / "m"))
    assert os.path.isfile(tmp_path / "m" / "tokenizer.json") and loaded.eos_id == tok.token_to_id("<|endoftext|>")
    assert loaded.decode(loaded.encode("the cat sat")) == "the cat sat"


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        HybridLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json in the directory"):
        HybridLM.from_pretrained(str(tmp_path))
    _model("LF").save_pretrained(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors beside config.json"):
        HybridLM.from_pretrained(str(tmp_path / "m"))
    _model("LF").save_pretrained(str(tmp_path / "m"))
    _model("LL").save_pretrained(str(tmp_path / "other"))
    os.replace(tmp_path / "other" / "model.safetensors", tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="different models"):
        HybridLM.from_pretrained(str(tmp_path / "m"))


def test_decode_argument_errors():
    model = _model("LF", max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, [1, 2, 3], 30)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, [1, 2], 3, greedy=False, temperature=0.0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        generate(model, [1, 2], 3, greedy=False, top_p=1.5)
    with pytest.raises(ValueError, match=r"prompt ids in \[0, 61\)"):
        generate(model, [1, 99], 3)
    with pytest.raises(ValueError, match="S >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launchers.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_text_then_ids_on_the_last_line(tmp_path, capsys):
    """One real subprocess (the command line as users type it); the other cases call main() in process."""
    from launchers.generate import main
    model = _model("LF", vocab_size=257, seed=2)
    model.save_pretrained(str(tmp_path), tokenizer="byte")
    res = _cli("--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "6", "--ignore-eos")
    assert res.returncode == 0, res.stderr
    ids = [int(t) for t in res.stdout.splitlines()[-1].split()]
    assert ids == generate(model, list(b"Hi"), 6)[0].tolist()
    assert res.stdout.splitlines()[0] == bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    assert main(["--model", str(tmp_path), "--prompt-ids", "72 105", "--max-new-tokens", "4", "--temperature",
                 "0.7", "--top-p", "0.9", "--seed", "1", "--ignore-eos"]) == 0
    want = generate(model, [72, 105], 4, greedy=False, temperature=0.7, top_p=0.9, seed=1)[0].tolist()
    assert capsys.readouterr().out.splitlines()[-1] == " ".join(map(str, want))
    for bad, msg in ((["--model", str(tmp_path / "nope"), "--prompt-ids", "1"], "no such directory"),
                     (["--model", str(tmp_path), "--prompt-ids", "1 x"], "integers separated by spaces"),
                     (["--model", str(tmp_path), "--prompt-ids", "1", "--top-p", "0.5"], "--top-p together with")):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, err
    with pytest.raises(SystemExit):  # argparse: --prompt or --prompt-ids is required
        main(["--model", str(tmp_path)])
