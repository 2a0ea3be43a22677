"""`python -m dist_attn.data.prepare`: inputs (text files, directories, JSON Lines, Parquet), tokenizers
(byte, trained byte-level BPE), EOS placement, meta data, worker-count independence, error locations,
atomic outputs, and the held-out split by document."""
import gzip
import json
import os

import numpy as np
import pytest

from dist_attn.data import TokenDataset, resolve_val_path, vocab_size_from_meta
from dist_attn.data import prepare as prep_mod
from dist_attn.data.prepare import main as prepare_main
from dist_attn.data.prepare import prepare

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦊 and tabs\tand  double  spaces.\n\nSecond paragraph.",
    "short",
    "A literal <|endoftext|> inside a document is text, not a document end.",
    "  leading spaces and trailing newline\n\n",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "The quick brown fox jumps over the lazy dog.\n",  # an exact duplicate of the first
    "x" * 300,
]


def _docs_of(path, eos, dtype="<u2"):
    """The token file split after every EOS (each document keeps its EOS, the file ends with one)."""
    ids = np.fromfile(path, dtype=dtype).astype(np.int64)
    assert ids.size and ids[-1] == eos, "every document, the last one too, ends with EOS"
    ends = np.flatnonzero(ids == eos) + 1
    return [tuple(d) for d in np.split(ids, ends[:-1])]


def _write_files(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = root / f"doc{i:02d}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(p)
    return paths


def _leftovers(d):
    return [n for n in os.listdir(d) if ".tmp-" in n]


def test_files_directory_eos_and_meta(tmp_path):
    corpus = tmp_path / "corpus"
    _write_files(corpus / "b", DOCS[:2])
    _write_files(corpus / "a", DOCS[2:4])
    (corpus / ".hidden").write_text("never read")
    (corpus / "a" / "empty.txt").write_text("")
    single = tmp_path / "single.txt"
    single.write_bytes(b"\x00\xff raw bytes are fine at byte level")
    out = str(tmp_path / "out.bin")
    meta = prepare([str(single), str(corpus)], out)
    # order: the file, then the directory's files in sorted path order (a/, b/); empty and hidden dropped
    order = [single.read_bytes()] + [d.encode() for d in DOCS[2:4] + DOCS[:2]]
    expect = [tuple(list(b) + [256]) for b in order]
    assert _docs_of(out, 256) == expect
    on_disk = json.load(open(out + ".json"))
    assert on_disk == meta
    assert meta["format"] == "dist_attn.tokens/2" and meta["split"] == "train"
    assert (meta["tokenizer"], meta["tokenizer_kind"], meta["vocab_size"], meta["eos_id"]) == ("byte", "byte", 257, 256)
    assert meta["dtype"] == "uint16" and meta["num_documents"] == 5 and meta["num_empty"] == 1
    assert meta["num_tokens"] == sum(map(len, expect)) == os.path.getsize(out) // 2
    assert meta["val_path"] is None and meta["num_skipped"] == 0
    assert vocab_size_from_meta(out) == 257 and TokenDataset(out, 8).eos_id == 256
    assert not _leftovers(tmp_path)
    # outputs written inside an input directory are not read back on the next run
    inner = str(corpus / "tokens.bin")
    first = prepare([str(corpus)], inner, val_fraction=0.5, seed=3)
    assert prepare([str(corpus)], inner, val_fraction=0.5, seed=3) == first


def _jsonl(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_jsonl_corrupt_line_skip_and_fail(tmp_path, capsys):
    good = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS[:4])]
    lines = good[:2] + ['{"body": "unterminated', ""] + good[2:3] + ['{"id": 7}'] + good[3:] + \
        ['{"body": "lone \\ud800 surrogate"}']
    src = tmp_path / "docs.jsonl"
    _jsonl(src, lines)
    gz = tmp_path / "more.jsonl.gz"
    _jsonl(gz, [json.dumps({"body": "from a gzip file"})])
    out = str(tmp_path / "j.bin")
    # fail (default): the first bad line, with its location, and nothing written
    with pytest.raises(ValueError, match=r"docs\.jsonl:3: expected a readable document.*not a JSON line.*Fix"):
        prepare([str(src), str(gz)], out, text_field="body")
    assert not os.path.exists(out) and not os.path.exists(out + ".json") and not _leftovers(tmp_path)
    assert prepare_main(["--input", str(src), "--output", out, "--text-field", "body", "--quiet"]) == 2
    assert "docs.jsonl:3" in capsys.readouterr().err and not os.path.exists(out)
    # skip: both bad lines reported with their line numbers, the rest kept in order
    assert prepare_main(["--input", str(src), str(gz), "--output", out, "--text-field", "body",
                         "--on-error", "skip", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "docs.jsonl:3" in err and "docs.jsonl:6" in err and "no string field 'body'" in err
    meta = json.load(open(out + ".json"))
    assert meta["num_skipped"] == 3 and meta["skipped"][0].startswith(f"{src}:3: not a JSON line (")
    assert meta["skipped"][1].startswith(f"{src}:6: no string field 'body'")
    assert meta["skipped"][2].startswith(f"{src}:8: invalid Unicode")
    assert meta["text_field"] == "body" and meta["num_documents"] == 5
    assert _docs_of(out, 256) == [tuple(list(d.encode()) + [256]) for d in DOCS[:4] + ["from a gzip file"]]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the optional `data` extra) is not installed")
    import pyarrow.parquet as pq
    path = tmp_path / "docs.parquet"
    texts = DOCS[:3] + [None] + DOCS[3:5]
    pq.write_table(pa.table({"content": texts, "n": list(range(6))}), path, row_group_size=2)
    out = str(tmp_path / "p.bin")
    with pytest.raises(ValueError, match=r"docs\.parquet:row 3: .*not a string"):
        prepare([str(path)], out, text_field="content")
    meta = prepare([str(path)], out, text_field="content", on_error="skip")
    assert meta["num_documents"] == 5 and meta["skipped"] == [f"{path}:row 3: column 'content' holds NoneType, "
                                                              "not a string"]
    assert _docs_of(out, 256) == [tuple(list(d.encode()) + [256]) for d in DOCS[:5]]
    with pytest.raises(ValueError, match=r"docs\.parquet: .*no column 'text'"):
        prepare([str(path)], out)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    meta = prepare([str(bad), str(path)], out, text_field="content", on_error="skip")
    assert meta["num_skipped"] == 2 and "bad.parquet: not a readable Parquet file" in meta["skipped"][0]


def test_trained_bpe_round_trip_and_workers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    paths = _write_files(tmp_path / "c", DOCS)
    out1, out2 = str(tmp_path / "w1.bin"), str(tmp_path / "w2.bin")
    args = dict(train_tokenizer=320, val_fraction=0.25, seed=3)
    m1 = prepare([str(tmp_path / "c")], out1, workers=1, **args)
    m2 = prepare([str(tmp_path / "c")], out2, workers=2, **args)
    # worker count does not change a single byte of any output
    for suffix in ("", ".val", ".tokenizer.json"):
        assert open(out1 + suffix, "rb").read() == open(out2 + suffix, "rb").read(), suffix
    assert {k: v for k, v in m1.items() if "path" not in k and k != "tokenizer"} == \
        {k: v for k, v in m2.items() if "path" not in k and k != "tokenizer"}
    assert m1["tokenizer"] == os.path.abspath(out1 + ".tokenizer.json") and m1["tokenizer_kind"] == "hf"
    assert m1["eos_token"] == "<|endoftext|>" and m1["eos_id"] == 0 and 257 <= m1["vocab_size"] <= 320
    tok = tokenizers.Tokenizer.from_file(out1 + ".tokenizer.json")
    assert tok.get_vocab_size() == m1["vocab_size"]
    docs = _docs_of(out1, 0) + _docs_of(out1 + ".val", 0)
    texts = sorted(tok.decode(list(d[:-1]), skip_special_tokens=False) for d in docs)
    assert texts == sorted(p.read_text(encoding="utf-8") for p in paths), "decode(encode(doc)) == doc"
    assert max(max(d) for d in docs) < m1["vocab_size"] and all(d.count(0) == 1 for d in docs)


def test_validation_split_by_document(tmp_path):
    docs = [f"document {i}: " + "word " * (i % 7) for i in range(60)] + DOCS[:1] * 3
    _write_files(tmp_path / "c", docs)
    out = str(tmp_path / "s.bin")
    meta = prepare([str(tmp_path / "c")], out, val_fraction=0.2, seed=11, workers=2)
    val = out + ".val"
    vmeta = json.load(open(val + ".json"))
    assert meta["val_path"] == vmeta["val_path"] == os.path.abspath(val) and vmeta["split"] == "val"
    train_docs, val_docs = _docs_of(out, 256), _docs_of(val, 256)
    assert len(train_docs) == meta["num_documents"] and len(val_docs) == vmeta["num_documents"] > 0
    assert meta["num_documents"] + vmeta["num_documents"] == len(docs)
    assert not set(train_docs) & set(val_docs), "no document on both sides (duplicates stay together)"
    assert sorted(train_docs + val_docs) == sorted(tuple(list(d.encode()) + [256]) for d in docs)
    assert 4 <= len(val_docs) <= 22  # ~0.2 of 63
    assert resolve_val_path(out) == val
    # deterministic: the same seed gives the same files; another seed another split
    again = str(tmp_path / "again.bin")
    prepare([str(tmp_path / "c")], again, val_fraction=0.2, seed=11, workers=1)
    assert open(again + ".val", "rb").read() == open(val, "rb").read()
    other = str(tmp_path / "other.bin")
    prepare([str(tmp_path / "c")], other, val_fraction=0.2, seed=12)
    assert set(_docs_of(other + ".val", 256)) != set(val_docs)
    # no held-out document at a tiny fraction: an error, and nothing written
    with pytest.raises(ValueError, match="val-fraction.*Fix: raise"):
        prepare([str(tmp_path / "c" / "doc00.txt")], str(tmp_path / "none.bin"), val_fraction=0.01)
    assert not os.path.exists(tmp_path / "none.bin")
    # re-running without a split removes the stale held-out file (it would overlap training)
    prepare([str(tmp_path / "c")], out)
    assert not os.path.exists(val) and not os.path.exists(val + ".json") and resolve_val_path(out) is None


def test_atomic_outputs(tmp_path, monkeypatch):
    _write_files(tmp_path / "c", DOCS)
    out = str(tmp_path / "a.bin")
    prepare([str(tmp_path / "c")], out, val_fraction=0.3, seed=1)
    before = {s: open(out + s, "rb").read() for s in ("", ".json", ".val", ".val.json")}
    # a corrupt input after many documents have been written: the old outputs stay, no temp files
    _jsonl(tmp_path / "c" / "zz.jsonl", ['{"text": "fine"}', "{broken"])
    with pytest.raises(ValueError, match=r"zz\.jsonl:2"):
        prepare([str(tmp_path / "c")], out, val_fraction=0.3, seed=1, workers=2)
    assert {s: open(out + s, "rb").read() for s in before} == before and not _leftovers(tmp_path)
    # Ctrl-C in the middle of tokenising: same, for a fresh output too
    calls = []
    real = prep_mod.encode_chunk

    def interrupted(chunk):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(prep_mod, "encode_chunk", interrupted)
    monkeypatch.setattr(prep_mod, "CHUNK_DOCS", 2)
    fresh = str(tmp_path / "fresh.bin")
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "c")], fresh, train_tokenizer=300, on_error="skip")
    assert len(calls) == 2 and not [n for n in os.listdir(tmp_path) if n.startswith("fresh")]
    assert not _leftovers(tmp_path)


def test_errors(tmp_path):
    _write_files(tmp_path / "c", DOCS[:2])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = str(tmp_path / "e.bin")
    # a non-UTF-8 file under a real tokenizer: reported with its path, skipped on request
    with pytest.raises(ValueError, match=r"latin1\.txt: expected a readable document, got not UTF-8"):
        prepare([str(tmp_path / "latin1.txt"), str(tmp_path / "c")], out, train_tokenizer=300)
    meta = prepare([str(tmp_path / "latin1.txt"), str(tmp_path / "c")], out, train_tokenizer=300, on_error="skip")
    assert meta["num_documents"] == 2 and meta["num_skipped"] == 1
    # ... while the byte level reads any bytes
    assert prepare([str(tmp_path / "latin1.txt")], out)["num_tokens"] == 5
    with pytest.raises(ValueError, match="existing files or directories"):
        prepare([str(tmp_path / "nope")], out)
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="directories given are empty"):
        prepare([str(tmp_path / "void")], out)
    with pytest.raises(ValueError, match="at least one non-empty training document"):
        prepare([str(_write_files(tmp_path / "e", [""])[0])], out)
    with pytest.raises(ValueError, match="at least 257"):
        prepare([str(tmp_path / "c")], out, train_tokenizer=100)
    with pytest.raises(ValueError, match="either --tokenizer or --train-tokenizer"):
        prepare([str(tmp_path / "c")], out, str(tmp_path / "t.json"), train_tokenizer=300)
    with pytest.raises(ValueError, match="val-fraction.*\\[0, 1\\)"):
        prepare([str(tmp_path / "c")], out, val_fraction=1.0)
    with pytest.raises(ValueError, match="workers"):
        prepare([str(tmp_path / "c")], out, workers=0)
    with pytest.raises(ValueError, match="eos-token.*drop"):
        prepare([str(tmp_path / "c")], out, eos_token="</s>")
    tok_json = out + ".tokenizer.json"
    with pytest.raises(ValueError, match="eos-token.*Fix"):
        prepare([str(tmp_path / "c")], out, tok_json, eos_token="<nope>")
    assert prepare([str(tmp_path / "c")], out, tok_json, eos_token="<|endoftext|>")["eos_id"] == 0
