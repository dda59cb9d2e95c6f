"""Token shards: the file contract, the tokenizer stage end to end, and the batch samplers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from lmpipe import warehouse
from lmpipe.bpe import EOT_ID, load_tokenizer, train_tokenizer
from lmpipe.config import IngestConfig, PipelineConfig, TokenizerConfig
from lmpipe.corpus import ingest
from lmpipe.shards import (
    IGNORE_INDEX,
    document_encoder,
    encode_documents,
    eval_batches,
    load_split,
    random_batch,
    read_meta,
    run_stage,
    split_batches,
    still_valid,
    token_dtype,
    train_from_warehouse,
)
from lmpipe.stage import NullLogger, StageContext, StageResult

LINES = [
    "Return the sum of a list of numbers; raise TypeError for anything else.",
    "def add(a: int, b: int) -> int:  return a + b  # the simplest function there is",
    "中文文档也必须完整地往返：编码，然后解码，得到同样的文本。",
    "Emoji survive too 😀👍🏽, as do accents: café, naïve, Ångström.",
    "A document that quotes <|endoftext|> must not be cut in two by it.",
]


class RecordingLogger(NullLogger):
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def metrics(self, values, step=None) -> None:
        self.logged.update(values)


@pytest.fixture(scope="module")
def corpus_ws(tmp_path_factory):
    """A workspace whose warehouse holds 100 small documents in all three splits."""
    from lmpipe.workspace import Workspace

    root = tmp_path_factory.mktemp("shards")
    src = root / "docs.txt"
    src.write_text("\n".join(f"{i}: {LINES[i % len(LINES)]}" for i in range(100)) + "\n", encoding="utf-8")
    ws = Workspace.resolve(root / "ws")
    ingest(ws, IngestConfig(sources=(str(src),), val_fraction=0.2, test_fraction=0.2), progress=False)
    return ws


def _run(ws, out_name: str, vocab_size: int = 320, log=None):
    cfg = PipelineConfig(tokenizer=TokenizerConfig(vocab_size=vocab_size, batch_documents=7))
    ctx = StageContext(ws, cfg, {}, ws.root / "artifacts" / "tokenizer" / out_name, log=log or NullLogger(),
                       progress=False)
    return run_stage(ctx)


def _split_texts(ws, split: str) -> list[str]:
    with warehouse.connect(ws, read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT text FROM documents WHERE split = ? ORDER BY doc_id", [split]).fetchall()]


def test_token_dtype():
    assert token_dtype(2**16) == np.dtype("<u2")
    assert token_dtype(2**16 + 1) == np.dtype("<u4")


def test_encode_documents_appends_eot_and_keeps_special_strings_as_text():
    tok = train_tokenizer([LINES * 3], TokenizerConfig(vocab_size=300))
    enc = document_encoder(tok)
    arr = encode_documents(enc, [LINES[4], "", LINES[2]], np.dtype("<u2"))
    assert arr.dtype == np.dtype("<u2")
    ends = np.flatnonzero(arr == EOT_ID)
    assert len(ends) == 3 and ends[-1] == len(arr) - 1 and ends[1] == ends[0] + 1  # "" is just the EOT
    docs = np.split(arr, ends + 1)[:-1]
    assert [enc.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs] == [LINES[4], "", LINES[2]]
    assert tok.encode(LINES[4]).ids.count(EOT_ID) == 1  # the plain tokenizer does read it as the special token
    assert tok.encode_special_tokens is False  # the copy's setting did not leak into the original


def test_stage_writes_the_shard_contract(corpus_ws):
    ws = corpus_ws
    log = RecordingLogger()
    out = _run(ws, "a", log=log)
    tok = load_tokenizer(ws.abs(out.outputs["tokenizer"]))
    shard_dir = ws.abs(out.outputs["shards"])
    assert out.outputs == {"tokenizer": "artifacts/tokenizer/a/tokenizer.json",
                           "shards": "artifacts/tokenizer/a/shards"}
    assert sorted(p.name for p in shard_dir.iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]

    meta = read_meta(shard_dir)
    assert {k: meta[k] for k in ("dtype", "vocab_size", "eot_id", "pad_id")} == {
        "dtype": "uint16", "vocab_size": 320, "eot_id": 0, "pad_id": 1}
    assert meta["tokenizer_sha256"] == hashlib.sha256(ws.abs(out.outputs["tokenizer"]).read_bytes()).hexdigest()
    for split in ("train", "val", "test"):
        texts = _split_texts(ws, split)
        assert texts, f"the fixture should fill {split}"
        tokens = load_split(shard_dir, split)
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable and tokens.dtype == np.uint16
        assert meta["splits"][split] == {"tokens": len(tokens), "documents": len(texts),
                                         "bytes": sum(len(t.encode("utf-8")) + 1 for t in texts)}
        # documents in doc_id order, each followed by <|endoftext|>, decode back exactly
        ends = np.flatnonzero(tokens == EOT_ID)
        assert len(ends) == len(texts) and ends[-1] == len(tokens) - 1
        docs = [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in np.split(tokens, ends + 1)[:-1]]
        assert docs == texts

    x, y = random_batch(load_split(shard_dir, "train"), 2, 8, 0)  # samples straight from the memmap
    assert torch.equal(x[:, 1:], y[:, :-1])

    val = meta["splits"]["val"]
    assert log.logged["val_bytes_per_token"] == pytest.approx((val["bytes"] - val["documents"])
                                                               / (val["tokens"] - val["documents"]))
    assert out.metrics["tokens_train"] == meta["splits"]["train"]["tokens"]


def test_stage_is_deterministic_and_checks_its_files(corpus_ws):
    ws = corpus_ws
    first, again = _run(ws, "b"), _run(ws, "c")
    assert first.fingerprint == again.fingerprint
    assert _run(ws, "d", vocab_size=300).fingerprint != first.fingerprint
    result = StageResult("tokenizer", "key", first.fingerprint, first.outputs, first.metrics)
    assert still_valid(ws, result)
    train = ws.abs(first.outputs["shards"]) / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])  # one token short
    assert not still_valid(ws, result)
    with pytest.raises(ValueError, match="meta.json says"):
        load_split(ws.abs(first.outputs["shards"]), "train")


def test_split_batches_stream_and_stop_at_max_bytes(corpus_ws):
    with warehouse.connect(corpus_ws, read_only=True) as con:
        batches = list(split_batches(con, "train", 7))
        assert [t for b in batches for t in b] == _split_texts(corpus_ws, "train")
        assert all(len(b) == 7 for b in batches[:-1])
        first = len(batches[0][0].encode("utf-8"))
        assert list(split_batches(con, "train", 1, max_bytes=first)) == [batches[0][:1]]
        assert list(split_batches(con, "train", 1, max_bytes=first + 1)) == [batches[0][:1], batches[0][1:2]]


def test_training_needs_train_documents(workspace):
    with warehouse.connect(workspace):
        pass  # an empty warehouse
    with pytest.raises(ValueError, match="no train documents"):
        train_from_warehouse(workspace, TokenizerConfig())


def test_load_split_uint32_and_empty(tmp_path):
    ids = np.array([70_000, 5, 0, 1, 0], dtype="<u4")
    ids.tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"")
    meta = {"dtype": "uint32", "vocab_size": 70_001, "eot_id": 0, "pad_id": 1, "tokenizer_sha256": "",
            "splits": {"train": {"tokens": 5, "documents": 2, "bytes": 9},
                       "val": {"tokens": 0, "documents": 0, "bytes": 0}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert load_split(tmp_path, "train").tolist() == [70_000, 5, 0, 1, 0]
    assert len(load_split(tmp_path, "val")) == 0
    with pytest.raises(KeyError, match="splits: train, val"):
        load_split(tmp_path, "test")


def test_random_batch_shifts_targets_and_follows_the_generator():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(tokens, 4, 16, 123)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: the target is the next token
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))
    assert int(x.min()) >= 0 and int(y.max()) <= 999
    assert torch.equal(random_batch(tokens, 4, 16, 123)[0], x)  # same seed, same batch
    g = torch.Generator().manual_seed(123)
    first, second = random_batch(tokens, 4, 16, g)[0], random_batch(tokens, 4, 16, g)[0]
    assert torch.equal(first, x) and not torch.equal(second, x)  # a generator moves on
    # with exactly block_size + 1 tokens the only window is the whole array
    x, y = random_batch(tokens[:9], 3, 8, 0)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    with pytest.raises(ValueError, match="too short"):
        random_batch(tokens[:8], 1, 8, 0)


def test_eval_batches_by_hand():
    tokens = np.arange(10, 20, dtype=np.uint16)  # 10 tokens, read as [EOT, 10, ..., 19]
    batches = list(eval_batches(tokens, batch_size=2, block_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 4), (1, 4)]
    (x0, y0), (x1, y1) = batches
    assert x0.tolist() == [[0, 10, 11, 12], [13, 14, 15, 16]]
    assert y0.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert x1.tolist() == [[17, 18, 19, 1]]  # padded with <|pad|>
    assert y1.tolist() == [[18, 19, IGNORE_INDEX, IGNORE_INDEX]]
    assert list(eval_batches(tokens[:0], 2, 4)) == []


@pytest.mark.parametrize(("n", "batch_size", "block_size"), [(1, 1, 1), (8, 2, 4), (9, 2, 4), (97, 3, 8)])
def test_eval_batches_target_every_token_once(n, batch_size, block_size):
    tokens = np.arange(1, n + 1, dtype=np.uint32)
    targets = torch.cat([y[y != IGNORE_INDEX] for _, y in eval_batches(tokens, batch_size, block_size)])
    assert targets.tolist() == tokens.tolist()
