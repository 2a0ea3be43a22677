"""Data: MQAR determinism and structure, the recall metric, token files via prepare, validation windows,
vocab from meta, CP sharding. (prepare in depth: test_prepare.py; packed documents: test_packing.py.)"""
import json
import os

import numpy as np
import pytest
import torch

from dist_attn.data import (MQARDataset, TokenDataset, recall_accuracy, shard_batch, unshard_batch,
                            vocab_size_from_meta)
from dist_attn.data.mqar import FILLER, IGNORE_INDEX
from dist_attn.data.prepare import main as prepare_main
from dist_attn.data.prepare import prepare
from dist_attn.layout import position_ids


# ------------------------------------------------------------------ MQAR
def test_mqar_deterministic_by_seed_and_step():
    ds = MQARDataset(seed=3)
    x1, y1 = ds.get_batch(7, 4)
    x2, y2 = MQARDataset(seed=3).get_batch(7, 4)  # a fresh object: nothing carried between calls
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, ds.get_batch(8, 4)[0]), "different steps must differ"
    assert not torch.equal(x1, MQARDataset(seed=4).get_batch(7, 4)[0]), "different seeds must differ"
    # the global batch does not depend on how it is split over data-parallel ranks
    xg, yg = ds.get_batch(7, 8)
    parts = [ds.get_batch(7, 2, dp_rank=r, dp_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), xg) and torch.equal(torch.cat([p[1] for p in parts]), yg)


@pytest.mark.parametrize("v,s,n,q", [(64, 64, 4, None), (33, 50, 6, 3), (7, 16, 3, 1)],
                         ids=["default", "odd-sizes", "tiny-vocab"])
def test_mqar_structure(v, s, n, q):
    ds = MQARDataset(vocab_size=v, seq_len=s, num_kv_pairs=n, num_queries=q, seed=1)
    x, y = ds.get_batch(0, 16)
    nq = n if q is None else q
    n_keys = (v - 1) // 2
    assert x.shape == y.shape == (16, s) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < v
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, vals = row_x[0:2 * n:2], row_x[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k <= n_keys for k in keys)
        assert all(n_keys < val < v for val in vals)
        table = dict(zip(keys, vals))
        labelled = [t for t, lab in enumerate(row_y) if lab != IGNORE_INDEX]
        assert len(labelled) == nq and all(t >= 2 * n for t in labelled)
        asked = [row_x[t] for t in labelled]
        assert len(set(asked)) == nq, "each key is queried at most once"
        for t in labelled:
            # label = value bound to the key at t, and that value is the next input token
            assert row_y[t] == table[row_x[t]] == row_x[t + 1]
        rest = set(range(2 * n, s)) - set(labelled) - {t + 1 for t in labelled}
        assert all(row_x[t] == FILLER for t in rest)


def test_recall_accuracy_perfect_and_zero():
    ds = MQARDataset()
    x, y = ds.get_batch(0, 4)
    v = ds.vocab_size
    mask = y != IGNORE_INDEX
    perfect = torch.nn.functional.one_hot(y.clamp(min=0), v).float()
    correct, total = recall_accuracy(perfect, y)
    assert int(total) == int(mask.sum()) > 0 and int(correct) == int(total)
    zero_logits = torch.zeros(4, ds.seq_len, v)
    zero_logits[..., FILLER] = 1.0  # always predicts filler, never a value
    correct, total = recall_accuracy(zero_logits, y)
    assert int(correct) == 0 and int(total) == int(mask.sum())
    # half right: corrupt every other labelled answer
    wrong = perfect.clone()
    idx = mask.nonzero()[::2]
    wrong[idx[:, 0], idx[:, 1]] = torch.nn.functional.one_hot(torch.zeros(len(idx), dtype=torch.long), v).float()
    correct, _ = recall_accuracy(wrong, y)
    assert int(correct) == int(total) - len(idx)


def test_mqar_errors():
    with pytest.raises(ValueError, match="num_kv_pairs.*expected 1..31"):
        MQARDataset(vocab_size=64, num_kv_pairs=40)
    with pytest.raises(ValueError, match="num_queries"):
        MQARDataset(num_kv_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="seq_len.*Fix"):
        MQARDataset(seq_len=12, num_kv_pairs=4)
    with pytest.raises(ValueError, match="dp_rank"):
        MQARDataset().get_batch(0, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="labels of shape"):
        recall_accuracy(torch.zeros(2, 8, 5), torch.zeros(2, 7, dtype=torch.long))


# ------------------------------------------------------------------ token files
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé bytes too.\n" * 5


def test_prepare_and_memmap_roundtrip(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8")
    b.write_bytes(b"\x00\xff second file")
    out = str(tmp_path / "train.bin")
    assert prepare_main(["--input", str(a), str(b), "--output", out]) == 0
    eos = 256  # byte level: ids 0..255 are bytes, one EOS after every document (each file)
    stream = np.concatenate([np.frombuffer(a.read_bytes(), np.uint8), [eos],
                             np.frombuffer(b.read_bytes(), np.uint8), [eos]]).astype(np.int64)
    meta = json.loads(open(out + ".json").read())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eos_id"] == eos
    assert meta["num_tokens"] == len(stream) and meta["num_documents"] == 2
    assert os.path.getsize(out) == 2 * len(stream)
    assert np.array_equal(np.fromfile(out, dtype="<u2"), stream)

    ds = TokenDataset(out, seq_len=32, seed=5)
    assert ds.num_tokens == len(stream) and ds.vocab_size == 257 and ds.eos_id == eos
    assert vocab_size_from_meta(out) == 257
    x, y = ds.get_batch(3, 6)
    assert x.shape == y.shape == (6, 32) and x.dtype == torch.long
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        # every row is a real window of the concatenated bytes, and labels are the next tokens
        starts = [i for i in range(len(stream) - 32) if np.array_equal(stream[i:i + 32], row_x)]
        assert starts and any(np.array_equal(stream[i + 1:i + 33], row_y) for i in starts)
    x2, y2 = TokenDataset(out, seq_len=32, seed=5).get_batch(3, 6)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, ds.get_batch(4, 6)[0])
    halves = [ds.get_batch(3, 3, dp_rank=r, dp_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)


def test_prepare_tokenizer_json(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(TEXT, encoding="utf-8")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        # without the package a tokenizer.json must give a clear error, never a download
        tok = tmp_path / "tokenizer.json"
        tok.write_text("{}")
        with pytest.raises(ValueError, match="tokenizers.*pip install tokenizers"):
            prepare([str(a)], str(tmp_path / "t.bin"), tokenizer=str(tok))
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[UNK]"] + sorted(set(TEXT.split())))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = str(tmp_path / "tokenizer.json")
    tk.save(tok)
    out = str(tmp_path / "t.bin")
    meta = prepare([str(a)], out, tokenizer=tok)
    ids = np.fromfile(out, dtype=np.uint16)
    # no EOS candidate in this vocabulary: EOS is a new id just past it
    assert meta["eos_id"] == len(vocab) and meta["vocab_size"] == len(vocab) + 1 and meta["eos_token"] is None
    assert meta["num_tokens"] == len(ids) and ids.tolist() == tk.encode(TEXT).ids + [len(vocab)]


def test_token_file_errors(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("hello world, a short file")
    with pytest.raises(ValueError, match="existing files or directories.*Fix"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "o.bin"))
    with pytest.raises(ValueError, match="existing writable directory"):
        prepare([str(a)], str(tmp_path / "no_dir" / "o.bin"))
    with pytest.raises(ValueError, match="local tokenizer.json"):
        prepare([str(a)], str(tmp_path / "o.bin"), tokenizer=str(tmp_path / "nope.json"))
    assert prepare_main(["--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o.bin")]) == 2
    with pytest.raises(ValueError, match="readable token file"):
        TokenDataset(str(tmp_path / "nothing.bin"), 8)
    out = str(tmp_path / "o.bin")
    prepare([str(a)], out)
    with pytest.raises(ValueError, match="at least seq_len"):
        TokenDataset(out, 100)
    with pytest.raises(ValueError, match="recorded"):
        TokenDataset(out, 8, dtype="uint32")
    with pytest.raises(ValueError, match="one of"):
        TokenDataset(out, 8, dtype="int8")
    os.remove(out + ".json")
    with pytest.raises(ValueError, match="no PATH.json"):
        TokenDataset(out, 8)
    assert TokenDataset(out, 8, dtype="uint16").vocab_size is None
    with pytest.raises(ValueError, match="vocab_size=auto.*Fix"):
        vocab_size_from_meta(out)


def test_sequential_validation_windows(tmp_path):
    """Validation windows tile the file: every token predicted once per pass, the same on every call
    whatever the seed, and the global batch does not depend on its split over DP ranks."""
    a = tmp_path / "a.txt"
    a.write_bytes(bytes(range(200)) * 2)  # 401 tokens with the EOS
    out = str(tmp_path / "v.bin")
    prepare([str(a)], out)
    s = 16
    ds = TokenDataset(out, s, seed=1, sequential=True)
    assert ds.num_windows == 400 // s == 25
    stream = np.fromfile(out, dtype="<u2").astype(np.int64)
    x, y = ds.get_batch(0, 5)
    for k in range(5):
        assert np.array_equal(x[k].numpy(), stream[k * s:(k + 1) * s])
        assert np.array_equal(y[k].numpy(), stream[k * s + 1:(k + 1) * s + 1])
    x1, _ = ds.get_batch(1, 5)  # batch 1 continues where batch 0 ended
    assert np.array_equal(x1[0].numpy(), stream[5 * s:6 * s])
    other = TokenDataset(out, s, seed=99, sequential=True)  # the seed does not matter
    assert torch.equal(other.get_batch(3, 4)[0], ds.get_batch(3, 4)[0])
    halves = [ds.get_batch(2, 2, dp_rank=r, dp_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), ds.get_batch(2, 4)[0])
    # wraps around after num_windows rows
    assert torch.equal(ds.get_batch(25, 1)[0], ds.get_batch(0, 1)[0])


# ------------------------------------------------------------------ CP sharding
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_shard_batch_roundtrip(layout, p):
    x, y = MQARDataset(seq_len=64).get_batch(0, 3)
    shards = [shard_batch(x, y, r, p, layout) for r in range(p)]
    assert all(ids.shape == lab.shape == pos.shape == (3, 64 // p) for ids, lab, pos in shards)
    assert torch.equal(unshard_batch([s[0] for s in shards], layout), x)
    assert torch.equal(unshard_batch([s[1] for s in shards], layout), y)
    for r, (ids, lab, pos) in enumerate(shards):
        assert torch.equal(pos[0], position_ids(64, r, p, layout)) and torch.equal(pos[1], pos[0])
        # positions index the global batch: the shard *is* the global columns at those positions
        assert torch.equal(ids, x[:, pos[0]]) and torch.equal(lab, y[:, pos[0]])
    # every labelled position lands on exactly one rank: no target is lost at shard boundaries
    assert sum(int((s[1] != IGNORE_INDEX).sum()) for s in shards) == int((y != IGNORE_INDEX).sum())


def test_shard_batch_errors():
    x = torch.zeros(2, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_batch(x, x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="cp_rank"):
        shard_batch(x, x, 2, 2, "contiguous")
    with pytest.raises(ValueError, match="one shape"):
        shard_batch(x, x[:, :-1], 0, 2, "contiguous")
    with pytest.raises(ValueError, match="expected one of"):
        shard_batch(x, x, 0, 2, "striped")
