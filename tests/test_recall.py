"""Long-context recall evaluation (dist_attn.eval): prompt construction, scoring, CP vs single process,
result JSON and heat map."""
from __future__ import annotations

import functools
import json
import logging
import sys

import numpy as np
import pytest
import torch

from dist_attn.eval import (SCHEMA, MQARProbe, default_lengths, evaluate_recall, format_table, make_task,
                            write_results)
from dist_attn.eval.tasks import SyntheticTextFiller
from dist_attn.model import HybridLM, ModelConfig
from tests.dist import run_distributed
from tests.utils import assert_close

DEPTHS = [0.0, 0.3, 0.5, 1.0]
# a byte-level LM (passkey needs the 256 byte ids) and an MQAR vocabulary of 16 inside it
CFG = dict(vocab_size=260, d_model=32, n_layers=2, pattern="LF", n_heads=2, head_dim=16, linear_heads=2,
           max_seq_len=512)


def oracle(vocab):
    """A model that 'knows' every answer: logits[t] = one-hot of input_ids[t + 1] (teacher forcing)."""
    def fn(ids, pos):
        assert pos.shape == ids.shape and torch.equal(pos[0], torch.arange(ids.shape[1]))
        out = torch.zeros(1, ids.shape[1], vocab)
        out[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 1.0
        return out
    return fn


def write_tokens(path, tokens, vocab=257):
    np.asarray(tokens, np.uint16).tofile(path)
    path.with_name(path.name + ".json").write_text(json.dumps(dict(dtype="uint16", vocab_size=vocab, eos_id=256,
                                                                   tokenizer="byte", num_tokens=len(tokens))))


# ------------------------------------------------------------------ prompt construction
@pytest.mark.parametrize("name", ["passkey", "mqar"])
def test_prompts_exact_length_depth_and_deterministic(name):
    task = make_task(name, vocab_size=260, mqar_vocab_size=16)
    for length in (130, 256, 1000):
        haystack0 = None
        for d in DEPTHS:
            p = task.prompt(length, d, seed=3, sample=1)
            assert p.input_ids.shape == (length,) and p.input_ids.dtype == np.int64
            # the same seed gives the same prompt; another seed or sample another one
            q = task.prompt(length, d, seed=3, sample=1)
            assert np.array_equal(p.input_ids, q.input_ids) and np.array_equal(p.answer_pos, q.answer_pos)
            assert not np.array_equal(p.input_ids, task.prompt(length, d, seed=4, sample=1).input_ids)
            assert not np.array_equal(p.input_ids, task.prompt(length, d, seed=3, sample=2).input_ids)
            # answers: the tokens after their positions; the last one ends the prompt
            assert np.array_equal(p.answer_ids, p.input_ids[p.answer_pos + 1])
            assert p.answer_pos.max() == length - 2
            # the needle at depth d: round(d * F) filler tokens before it (an even number for mqar)
            want = round(d * p.filler_len)
            assert p.needle_start == (want // 2 * 2 if name == "mqar" else want)
            needle = p.input_ids[p.needle_start:p.needle_start + p.needle_len]
            if name == "mqar":
                assert p.filler_len == length - 4 * task.num_kv_pairs
                keys, values = needle[0::2], needle[1::2]
                assert (keys >= 1).all() and (keys <= 7).all() and (values >= 8).all() and (values < 16).all()
                assert len(set(keys.tolist())) == len(keys)
                rest = np.delete(p.input_ids[:length - 2 * task.num_kv_pairs],
                                 np.arange(p.needle_start, p.needle_start + p.needle_len))
                assert (rest == 0).all()
                # every key is asked once, in the training format: key, then the value it had
                pairs = dict(zip(keys.tolist(), values.tolist()))
                asked = p.input_ids[p.answer_pos[:, 0]].tolist()
                assert sorted(asked) == sorted(keys.tolist())
                assert [pairs[k] for k in asked] == p.answer_ids[:, 0].tolist()
                assert p.answer_pos[:, 0].tolist() == list(range(length - 8, length, 2))
            else:
                text = bytes(needle.astype(np.uint8)).decode()
                assert text.startswith(" The pass key of ") and text.endswith(". Remember it.")
                value = bytes(p.answer_ids[0].astype(np.uint8)).decode()
                assert value[0] == " " and value[1:].isdigit() and len(value) == 6 and f" is{value}." in text
                assert p.answer_pos[0].tolist() == list(range(length - 7, length - 1))
                tail = bytes(p.input_ids[p.needle_len + p.filler_len:].astype(np.uint8)).decode()
                assert tail.startswith(" What is the pass key of ") and tail.endswith(f" is{value}")
            # the filler is the same at every depth: only the needle moves
            haystack = np.delete(p.input_ids, np.arange(p.needle_start, p.needle_start + p.needle_len))
            if haystack0 is not None:
                assert np.array_equal(haystack, haystack0)
            haystack0 = haystack


def test_passkey_filler_from_the_validation_stream(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 256, 5000)
    write_tokens(tmp_path / "t.bin", rng.integers(0, 256, 100))
    write_tokens(tmp_path / "t.bin.val", stream)
    task = make_task("passkey", vocab_size=257, data_path=str(tmp_path / "t.bin"))
    assert task.describe()["filler"].startswith("stream:") and task.describe()["filler"].endswith(".val")
    p = task.prompt(600, 0.4, seed=0, sample=0)
    filler = np.delete(p.input_ids, np.arange(p.needle_start, p.needle_start + p.needle_len))[:p.needle_start + 100]
    # a contiguous slice of the held-out file
    starts = [s for s in range(len(stream) - len(filler)) if np.array_equal(stream[s:s + len(filler)], filler)]
    assert starts, "the filler is not a slice of the validation stream"
    # no data file: synthetic text, still deterministic
    assert isinstance(make_task("passkey", vocab_size=257).filler, SyntheticTextFiller)


def test_errors_name_the_fix():
    task = make_task("mqar", vocab_size=16)
    oc = oracle(16)
    for kw, msg in [(dict(lengths=[64, 9999]), "max_seq_len"), (dict(lengths=[62]), "divisible by 4"),
                    (dict(depths=[1.5]), "fractions in \\[0, 1\\]"), (dict(lengths=[8]), "ints in \\[16")]:
        args = {**dict(lengths=[64], depths=[0.5], max_len=4096, chunks=4), **kw}
        with pytest.raises(ValueError, match=msg):
            evaluate_recall(oc, task, **args)
    with pytest.raises(ValueError, match="task=mqar"):
        make_task("passkey", vocab_size=64)
    with pytest.raises(ValueError, match="one of"):
        make_task("needle", vocab_size=64)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQARProbe(16, 8)
    assert default_lengths(4096) == [1024, 2048, 4096] and default_lengths(1 << 20)[-1] == 65536
    assert default_lengths(512) == [512]


# ------------------------------------------------------------------ scoring
def test_oracle_is_perfect_and_random_is_chance(tmp_path):
    for name in ("passkey", "mqar"):
        task = make_task(name, vocab_size=260, mqar_vocab_size=16)
        res = evaluate_recall(oracle(260), task, [256, 512], DEPTHS, samples=3)
        assert res.accuracy == [[1.0] * len(DEPTHS)] * 2, name
    # random logits over V=16: each query is right with probability 1/16
    task = MQARProbe(16, 4)
    g = torch.Generator().manual_seed(0)
    res = evaluate_recall(lambda ids, pos: torch.randn(1, ids.shape[1], 16, generator=g), task, [64, 128],
                          DEPTHS, samples=50)
    n = sum(map(sum, res.total))
    assert n == 2 * len(DEPTHS) * 50 * 4
    acc = sum(map(sum, res.correct)) / n
    assert abs(acc - 1 / 16) < 4 * (1 / 16 * 15 / 16 / n) ** 0.5, acc
    # a model that always predicts the same wrong token recalls nothing
    res = evaluate_recall(lambda ids, pos: torch.zeros(1, ids.shape[1], 16), task, [64], [0.5], samples=4)
    assert res.correct == [[0]] and res.total == [[16]]


def test_json_schema_table_and_heatmap(tmp_path, monkeypatch, caplog):
    task = MQARProbe(16, 4)
    res = evaluate_recall(oracle(16), task, [64, 128, 256], [0, 0.5, 1], samples=2, meta=dict(model="oracle"))
    out = write_results(res, str(tmp_path / "run" / "recall"))
    data = json.loads(open(out["json"]).read())
    assert data["schema"] == SCHEMA and data["task"]["name"] == "mqar" and data["chance"] == 1 / 8
    assert data["lengths"] == [64, 128, 256] and data["depths"] == [0, 0.5, 1] and data["samples"] == 2
    for key in ("accuracy", "correct", "total"):
        assert np.array(data[key]).shape == (3, 3), key
    assert data["accuracy_by_length"] == [1.0] * 3 and data["accuracy_by_depth"] == [1.0] * 3
    assert data["mean_accuracy"] == 1.0 and data["meta"]["model"] == "oracle" and "elapsed_s" in data["meta"]
    assert "| 128 | 1.00 | 1.00 | 1.00 | 1.00 |" in format_table(data)
    pytest.importorskip("matplotlib")
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # without matplotlib: the JSON alone and a warning saying how to get the PNG
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="dist_attn.eval"):
        out = write_results(res, str(tmp_path / "bare"))
    assert out["png"] is None and (tmp_path / "bare.json").exists() and not (tmp_path / "bare.png").exists()
    assert "pip install matplotlib" in caplog.text


# ------------------------------------------------------------------ CP over 2 gloo ranks
LENGTHS = [128, 256]


def _cp_worker(rank, world, cfg_kw):
    import torch.distributed as dist

    from dist_attn.context import CPContext
    from dist_attn.eval import cp_answer_fn, evaluate_recall_cp, run_recall
    from dist_attn.eval.recall import full_logits_answer_fn

    out = {}
    torch.manual_seed(0)
    single = HybridLM(ModelConfig(**cfg_kw))
    for layout in ("zigzag", "contiguous"):
        cp = CPContext(group=dist.group.WORLD, layout=layout, backend="torch")
        torch.manual_seed(0)
        model = HybridLM(ModelConfig(**cfg_kw), cp)
        for name in ("passkey", "mqar"):
            task = make_task(name, vocab_size=cfg_kw["vocab_size"], mqar_vocab_size=16)
            res = evaluate_recall_cp(model, cp, task, LENGTHS, [0, 0.5, 1], samples=2)
            p = task.prompt(256, 0.5, 0, 0)
            logits = cp_answer_fn(model, cp)(torch.from_numpy(p.input_ids)[None],
                                             torch.from_numpy(p.answer_pos.reshape(-1)))
            out[(layout, name)] = (res.to_json(), {k: v.tolist() for k, v in res.predictions.items()}, logits.numpy())
    # data parallel: two replicas of the single-process model split the samples and sum the counts
    task = make_task("mqar", vocab_size=cfg_kw["vocab_size"], mqar_vocab_size=16)
    logits_fn = full_logits_answer_fn(lambda ids, pos: single(ids, pos))
    out["dp"] = run_recall(logits_fn, task, LENGTHS, [0, 0.5, 1], samples=3, dp_rank=rank, dp_size=world,
                           dp_group=dist.group.WORLD).to_json()
    return out


@functools.lru_cache(maxsize=None)
def _cp_results():
    return run_distributed(_cp_worker, 2, CFG, timeout=240.0, reuse=True)


def test_cp_recall_matches_single_process():
    results = _cp_results()
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**CFG))
    for name in ("passkey", "mqar"):
        task = make_task(name, vocab_size=CFG["vocab_size"], mqar_vocab_size=16)
        ref = evaluate_recall(model, task, LENGTHS, [0, 0.5, 1], samples=2)
        p = task.prompt(256, 0.5, 0, 0)
        ref_logits = model(torch.from_numpy(p.input_ids)[None], torch.arange(256)[None])[0, p.answer_pos.reshape(-1)]
        for layout in ("zigzag", "contiguous"):
            for rank, out in enumerate(results):
                got, preds, logits = out[(layout, name)]
                assert got["correct"] == ref.to_json()["correct"] and got["total"] == ref.to_json()["total"]
                assert got["meta"]["cp"] == 2 and got["meta"]["layout"] == layout
                assert preds == {k: v.tolist() for k, v in ref.predictions.items()}, (layout, name, rank)
                assert_close(f"{layout} {name} answer logits rank {rank}", ref_logits.detach(),
                             torch.from_numpy(logits))
    ref = evaluate_recall(model, make_task("mqar", vocab_size=CFG["vocab_size"], mqar_vocab_size=16), LENGTHS,
                          [0, 0.5, 1], samples=3).to_json()
    for out in results:
        assert out["dp"]["correct"] == ref["correct"] and out["dp"]["total"] == ref["total"]


def test_passkey_with_a_tokenizer_json(tmp_path):
    from dist_attn.data.tokenize import train_bpe
    texts = ["The pass key of gufe is 72829. Remember it. What is the pass key?"] * 20 + \
        ["some filler text about nothing in particular, with numbers 0 1 2 3 4 5 6 7 8 9."] * 20
    tok = train_bpe(texts, 300)
    tok.save(str(tmp_path / "tok.json"))
    task = make_task("passkey", vocab_size=300, tokenizer=str(tmp_path / "tok.json"))
    p = task.prompt(400, 0.5, seed=0, sample=0)
    assert p.input_ids.shape == (400,) and p.input_ids.max() < 300
    needle = tok.decode(p.input_ids[p.needle_start:p.needle_start + p.needle_len].tolist())
    assert needle.strip().startswith("The pass key of") and tok.decode(p.answer_ids[0].tolist()).strip().isdigit()
    assert evaluate_recall(oracle(300), task, [400], [0, 1], samples=2).accuracy == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="tokenizer"):
        make_task("passkey", vocab_size=299, tokenizer=str(tmp_path / "tok.json"))
