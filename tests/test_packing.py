"""Packed documents (data.documents=true): cu_seqlens at EOS and row boundaries, labels -100 exactly at
document ends, positions restarting per document, long documents split at rows, the validation
stream, and CP sharding of a packed row in both layouts."""
import json
import os

import numpy as np
import pytest
import torch

from dist_attn.data import (IGNORE_INDEX, DocumentDataset, PackedBatch, TokenDataset, open_dataset,
                            pack_windows, shard_packed, unshard_batch, validation_dataset)
from dist_attn.data.prepare import prepare
from dist_attn.layout import position_ids

EOS = 256


def _naive(windows, eos):
    """Token by token: document id, position in the document, label; cu_seqlens from the ids."""
    b, s1 = windows.shape
    s = s1 - 1
    ids, labels, pos, doc = [], [], [], []
    d = -1
    for r in range(b):
        for t in range(s):
            tok, nxt = int(windows[r, t]), int(windows[r, t + 1])
            if t == 0 or int(windows[r, t - 1]) == eos:
                d, p = d + 1, 0
            ids.append(tok)
            labels.append(IGNORE_INDEX if tok == eos else nxt)
            pos.append(p)
            doc.append(d)
            p += 1
    cu = [0] + [i for i in range(1, len(doc)) if doc[i] != doc[i - 1]] + [len(doc)]
    return ids, labels, pos, cu


@pytest.mark.parametrize("rows", [
    [[5, 6, EOS, 7, 8, 9, EOS, 1, 2], [EOS, 3, 4, 5, 6, 7, 8, EOS, 9]],   # EOS first / last-but-one
    [[1, 2, 3, 4, 5, 6, 7, 8, 9], [EOS, EOS, 1, EOS, 2, 3, 4, 5, EOS]],   # no EOS; 1-token documents
    [[1, 2, 3, 4, 5, 6, 7, EOS, 2]],                                      # EOS at the row's last token
], ids=["mixed", "long-and-tiny", "eos-at-row-end"])
def test_pack_windows_against_naive(rows):
    w = torch.tensor(rows)
    got = pack_windows(w, EOS)
    ids, labels, pos, cu = _naive(w, EOS)
    n = w.shape[0] * (w.shape[1] - 1)
    assert got.input_ids.shape == got.labels.shape == got.position_ids.shape == (1, n)
    assert got.input_ids[0].tolist() == ids and got.labels[0].tolist() == labels
    assert got.position_ids[0].tolist() == pos
    assert got.cu_seqlens.dtype == torch.int32 and got.cu_seqlens.tolist() == cu
    assert bool((got.cu_seqlens[1:] > got.cu_seqlens[:-1]).all()), "strictly increasing, no empty document"


def test_pack_windows_hand_example():
    # one row "a b EOS c" + next token "d": documents [a b EOS] [c], c predicts d (same document in the file)
    got = pack_windows(torch.tensor([[10, 11, EOS, 12, 13], [14, EOS, 15, 16, 17]]), EOS)
    assert got.cu_seqlens.tolist() == [0, 3, 4, 6, 8]
    assert got.labels[0].tolist() == [11, EOS, -100, 13, EOS, -100, 16, 17]
    assert got.position_ids[0].tolist() == [0, 1, 2, 0, 0, 1, 0, 1]


def _corpus(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    root = tmp_path / "c"
    root.mkdir()
    for i, n in enumerate(lengths):
        (root / f"d{i:03d}.txt").write_bytes(bytes(rng.integers(97, 123, size=n, dtype=np.uint8)))
    out = str(tmp_path / "docs.bin")
    prepare([str(root)], out)
    return out


def test_document_dataset_from_token_file(tmp_path):
    # long-tailed lengths: many short documents, a few longer than S
    s = 24
    out = _corpus(tmp_path, [1, 3, 5, 2, 40, 7, 1, 9, 80, 4, 11, 2, 6, 30, 3])
    ds = DocumentDataset(out, s, seed=4)
    assert ds.eos_id == EOS and ds.vocab_size == 257
    batch = ds.get_batch(2, 6)
    assert isinstance(batch, PackedBatch)
    ids, labels, pos, cu = batch
    # the same windows as without documents: only the masks differ
    x, y = TokenDataset(out, s, seed=4).get_batch(2, 6)
    assert torch.equal(ids, x.reshape(1, -1))
    eos = ids[0] == EOS
    assert torch.equal(labels[0][~eos], y.reshape(-1)[~eos]) and bool((labels[0][eos] == IGNORE_INDEX).all())
    assert int((labels == IGNORE_INDEX).sum()) == int(eos.sum()), "-100 exactly at document ends"
    # cu_seqlens: row starts and the token after every EOS (except at a row end)
    flat_eos = torch.nonzero(eos).flatten()
    expect = sorted(set(range(0, 6 * s, s)) | {int(e) + 1 for e in flat_eos if (int(e) + 1) % s}) + [6 * s]
    assert cu.tolist() == expect
    # positions restart at 0 at each document start and count up to its length
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[0, a:b].tolist() == list(range(b - a))
    assert torch.equal(DocumentDataset(out, s, seed=4).get_batch(2, 6).cu_seqlens, cu), "deterministic"
    halves = [ds.get_batch(2, 3, dp_rank=r, dp_size=2).input_ids for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), ids)


def test_document_longer_than_seq_len_is_split(tmp_path):
    s = 16
    out = _corpus(tmp_path, [3 * s + 5, 4, 20])  # doc 0 spans four rows of the sequential stream
    ds = DocumentDataset(out, s, sequential=True)
    ids, labels, pos, cu = ds.get_batch(0, 4)
    # rows 0-2 lie inside the long document: each is a document of S tokens, every label valid
    assert cu.tolist()[:4] == [0, s, 2 * s, 3 * s]
    assert pos[0, :3 * s].tolist() == list(range(s)) * 3
    assert not bool((labels[0, :3 * s] == IGNORE_INDEX).any())
    # the piece's last token predicts the continuation in the next row (same document in the file)
    stream = np.fromfile(out, dtype="<u2").astype(np.int64)
    assert labels[0, s - 1].item() == stream[s] == ids[0, s].item()
    # row 3: the rest of doc 0 (5 tokens + EOS), the 4-token doc + EOS, the start of the third
    assert cu.tolist()[3:] == [3 * s, 3 * s + 6, 3 * s + 11, 4 * s]
    assert pos[0, 3 * s:].tolist() == list(range(6)) + list(range(5)) + list(range(5))
    assert labels[0, 3 * s + 5].item() == IGNORE_INDEX and ids[0, 3 * s + 5].item() == EOS


def test_validation_stream(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(40):
        (root / f"{i}.txt").write_text(f"validation document number {i} " * (1 + i % 3))
    out = str(tmp_path / "t.bin")
    prepare([str(root)], out, val_fraction=0.3, seed=2)
    val = validation_dataset(out, 32, documents=True)
    assert isinstance(val, DocumentDataset) and val.tokens.path == out + ".val" and val.tokens.sequential
    a = [val.get_batch(i, 2) for i in range(3)]
    b = [validation_dataset(out, 32, documents=True).get_batch(i, 2) for i in range(3)]
    for p, q in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(p, q))
    plain = validation_dataset(None, 32, val_path=out + ".val")
    assert isinstance(plain, TokenDataset) and torch.equal(plain.get_batch(1, 2)[0].reshape(1, -1), a[1].input_ids)
    assert validation_dataset(str(tmp_path / "nothing.bin"), 32) is None
    with pytest.raises(ValueError, match="data.val_path.*Fix"):
        validation_dataset(out, 32, val_path=str(tmp_path / "missing.val"))
    assert isinstance(open_dataset(out, 32, documents=False), TokenDataset)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_packed_roundtrip(tmp_path, layout):
    out = _corpus(tmp_path, [1, 2, 17, 3, 1, 8, 50, 2, 5])
    s, b = 24, 3
    batch = DocumentDataset(out, s, seed=1).get_batch(0, b)
    for p in (1, 2, 3, 4):
        if (b * s) % (2 * p if layout == "zigzag" else p):
            continue
        shards = [shard_packed(batch, r, p, layout) for r in range(p)]
        for r, sh in enumerate(shards):
            assert sh.input_ids.shape == sh.labels.shape == sh.position_ids.shape == (1, b * s // p)
            assert sh.cu_seqlens is batch.cu_seqlens, "cu_seqlens stays global, the same on every rank"
            glob = position_ids(b * s, r, p, layout)
            assert torch.equal(sh.input_ids[0], batch.input_ids[0, glob])
            assert torch.equal(sh.position_ids[0], batch.position_ids[0, glob])
        for field in ("input_ids", "labels", "position_ids"):
            assert torch.equal(unshard_batch([getattr(sh, field) for sh in shards], layout), getattr(batch, field))


def test_packing_errors(tmp_path):
    a = tmp_path / "raw.bin"
    np.arange(100, dtype="<u2").tofile(a)
    with pytest.raises(ValueError, match="eos_id.*Fix: re-run"):
        DocumentDataset(str(a), 8, dtype="uint16")
    assert DocumentDataset(str(a), 8, dtype="uint16", eos_id=7).eos_id == 7
    with pytest.raises(ValueError, match="pack_windows.*\\[B, S \\+ 1\\]"):
        pack_windows(torch.zeros(5, dtype=torch.long), EOS)
    good = pack_windows(torch.arange(18).reshape(2, 9), EOS)
    with pytest.raises(ValueError, match="divisible by 6"):
        shard_packed(good, 0, 3, "zigzag")  # 16 packed tokens over 2P = 6 chunks
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard_packed(good._replace(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), 0, 2, "zigzag")
    with pytest.raises(ValueError, match="one shape \\[1, N\\]"):
        shard_packed(good._replace(labels=good.labels[:, 1:]), 0, 2, "contiguous")
    with pytest.raises(ValueError, match="cp_rank"):
        shard_packed(good, 2, 2, "contiguous")
    meta = json.load(open(_corpus(tmp_path, [4, 4]) + ".json"))
    assert meta["eos_id"] == EOS and os.path.exists(tmp_path / "docs.bin")


def test_balance_pairs_per_rank():
    """Per-rank attended pairs of packed documents: dist_attn.documents.doc_cost (the one implementation,
    used by the cost model and benchmarks.doc_balance)."""
    from benchmarks.doc_balance import packed_offsets, pair_table
    from dist_attn.documents import doc_cost, visible_pairs

    def pairs(cu, p, layout):
        return doc_cost(cu, None, p, layout)["pairs"]

    def per_token(cu, window=None):  # keys each token attends: position in its document + 1, capped at W + 1
        return [visible_pairs((i, i + 1), (0, cu[-1]), cu, True, window, cu[-1]) for i in range(cu[-1])]

    n = 96
    one = [0, n]  # a single document: zigzag balances causal work exactly, contiguous does not
    assert len(set(pairs(one, 4, "zigzag"))) == 1
    contiguous = pairs(one, 4, "contiguous")
    assert sum(contiguous) == n * (n + 1) // 2 and contiguous[-1] > contiguous[0]
    tiny = list(range(n + 1))  # 1-token documents: every rank attends the same
    assert pairs(tiny, 3, "contiguous") == [32, 32, 32]
    cu = [0, 5, 6, 40, 96]
    windowed = per_token(cu, window=3)
    assert windowed[:6] == [1, 2, 3, 4, 4, 1] and max(windowed) == 4
    for layout in ("zigzag", "contiguous"):
        assert sum(pairs(cu, 2, layout)) == sum(per_token(cu))
    offsets = packed_offsets(4096, seed=1, median=512)
    assert offsets[-1] == 4096 and min(np.diff(offsets)) >= 1
    assert offsets == packed_offsets(4096, seed=1, median=512)
    rows = pair_table(4096, 512, worlds=(2,), seeds=range(2))
    assert [(r["P"], r["layout"]) for r in rows] == [(2, "zigzag"), (2, "contiguous")]
    assert all(r["ratio_mean"] >= 1.0 for r in rows)