"""Token shards: every split encoded into one flat binary file of token ids, memory-mapped for training.

Layout of a shard folder::

    train.bin, val.bin, test.bin   the split's documents in doc_id order, each followed by <|endoftext|>;
                                   little-endian uint16 when the vocabulary fits, else uint32
    meta.json                      dtype, vocab_size, eot_id, pad_id, tokenizer_sha256, and per split
                                   its tokens, documents and bytes (UTF-8 bytes + 1 per document)

``bytes`` counts one extra byte per document, the newline that ends it in a text file: predicting
``<|endoftext|>`` pays for the document's end, so summed loss over ``bytes`` is bits per byte on the
same scale as the n-gram stage's.

This module also holds the ``tokenizer`` stage (:func:`run_stage`): train the BPE of :mod:`lmpipe.bpe`
on the train split, then write the shards of every split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import duckdb
import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from lmpipe import warehouse
from lmpipe.bpe import EOT_ID, PAD_ID, save_tokenizer, train_tokenizer
from lmpipe.config import TokenizerConfig
from lmpipe.stage import StageContext, StageOutput, StageResult
from lmpipe.workspace import Workspace, atomic_write_text

SPLITS = ("train", "val", "test")
META_NAME = "meta.json"
IGNORE_INDEX = -100  # target value that F.cross_entropy skips by default


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


# ----------------------------------------------------------------------------------------------
# writing


def document_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` that reads special-token strings in documents as plain text.

    A document quoting ``<|endoftext|>`` must not end early, so only the separators this module
    inserts carry special ids.
    """
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc


def encode_documents(enc: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The documents' ids in one flat array, each document followed by the end-of-text id.

    ``enc`` should come from :func:`document_encoder`; ``encode_batch_fast`` runs on all cores.
    """
    ids = [e.ids for e in enc.encode_batch_fast(texts, add_special_tokens=False)]
    for doc in ids:
        doc.append(EOT_ID)
    return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(len(d) for d in ids))


@dataclass
class SplitStats:
    tokens: int = 0
    documents: int = 0
    bytes: int = 0


def write_split(
    batches: Iterator[list[str]], enc: Tokenizer, path: Path, dtype: np.dtype, bar: tqdm | None = None
) -> SplitStats:
    """Encode a stream of document batches into ``path`` through a temporary file and a rename."""
    stats = SplitStats()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for texts in batches:
                arr = encode_documents(enc, texts, dtype)
                fh.write(arr.tobytes())
                stats.tokens += len(arr)
                stats.documents += len(texts)
                stats.bytes += sum(len(t.encode("utf-8")) for t in texts) + len(texts)  # + the closing newline
                if bar is not None:
                    bar.update(len(texts))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def write_shards(
    con: duckdb.DuckDBPyConnection, tok: Tokenizer, shard_dir: Path, tokenizer_sha256: str,
    batch_documents: int = 4096, progress: bool = True,
) -> dict:
    """Encode every split of the warehouse into ``shard_dir``; write meta.json last and return it."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    enc = document_encoder(tok)
    counts = warehouse.split_counts(con)
    splits = {}
    for split in SPLITS:
        with tqdm(total=counts.get(split, 0), desc=f"encode {split}", unit="doc", disable=not progress) as bar:
            stats = write_split(split_batches(con, split, batch_documents), enc, shard_dir / f"{split}.bin", dtype, bar)
        splits[split] = asdict(stats)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": EOT_ID, "pad_id": PAD_ID,
            "tokenizer_sha256": tokenizer_sha256, "splits": splits}
    atomic_write_text(shard_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------------------------
# reading


def read_meta(shard_dir: str | Path) -> dict:
    """The shard folder's meta.json."""
    return json.loads((Path(shard_dir) / META_NAME).read_text(encoding="utf-8"))


def shard_files(meta: dict) -> list[str]:
    return [f"{split}.bin" for split in meta["splits"]]


def load_split(shard_dir: str | Path, split: str) -> np.ndarray:
    """The split's token ids, memory-mapped read-only (an empty array for an empty split)."""
    meta = read_meta(shard_dir)
    if split not in meta["splits"]:
        raise KeyError(f"no split {split!r} in {shard_dir}; splits: {', '.join(meta['splits'])}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    n = meta["splits"][split]["tokens"]
    path = Path(shard_dir) / f"{split}.bin"
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, meta.json says {n} tokens of {dtype.name}")
    if n == 0:
        return np.zeros(0, dtype)  # an empty file cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def sizes_match(shard_dir: Path, meta: dict) -> bool:
    """Every shard file exists with the size meta.json implies."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, s in meta["splits"].items():
        path = shard_dir / f"{split}.bin"
        if not path.exists() or path.stat().st_size != s["tokens"] * itemsize:
            return False
    return True


def random_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator_or_seed: torch.Generator | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at uniformly random offsets: inputs ``x`` and next-token targets ``y``.

    Pass a ``torch.Generator`` and keep it (its state is the data position to checkpoint); an int seed
    builds a fresh generator, so the same seed gives the same batch.
    """
    if len(tokens) <= block_size:
        raise ValueError(f"a split of {len(tokens)} tokens is too short for block_size {block_size}")
    g = generator_or_seed
    if not isinstance(g, torch.Generator):
        g = torch.Generator().manual_seed(int(g))
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=g).numpy()
    buf = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, eot_id: int = EOT_ID, pad_id: int = PAD_ID
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows covering the split once, ``batch_size`` windows at a time.

    The stream is read as if preceded by ``<|endoftext|>``, so every token of the split, the first
    included, is a target exactly once: summed loss over meta.json's ``bytes`` is bits per byte. The
    last window is padded (``x`` with ``pad_id``, ``y`` with -100, which cross-entropy ignores); the
    last batch may have fewer rows. Shapes: ``(rows, block_size)`` int64.
    """
    n = len(tokens)
    n_windows = -(-n // block_size)
    offsets = np.arange(block_size + 1)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        pos = starts[:, None] + offsets  # positions in the stream [EOT, *tokens], (B, T+1)
        buf = tokens[np.clip(pos - 1, 0, n - 1)].astype(np.int64)
        buf[pos == 0] = eot_id
        x, y = buf[:, :-1].copy(), buf[:, 1:].copy()
        x[pos[:, :-1] > n] = pad_id
        y[pos[:, 1:] > n] = IGNORE_INDEX
        yield torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# reading the warehouse


def split_batches(
    con: duckdb.DuckDBPyConnection, split: str, batch_documents: int, max_bytes: int = 0
) -> Iterator[list[str]]:
    """The texts of ``split`` in doc_id order, ``batch_documents`` at a time, streamed through a cursor.

    With ``max_bytes > 0`` the stream ends with the batch in which that many UTF-8 bytes were reached.
    """
    cur = con.cursor()  # its own cursor, so the connection stays free for other queries meanwhile
    try:
        cur.execute("SELECT text, n_bytes FROM documents WHERE split = ? ORDER BY doc_id", [split])
        seen = 0
        while rows := cur.fetchmany(batch_documents):
            yield [r[0] for r in rows]
            seen += sum(r[1] for r in rows)
            if max_bytes and seen >= max_bytes:
                return
    finally:
        cur.close()


# ----------------------------------------------------------------------------------------------
# the pipeline stage


def train_from_warehouse(ws: Workspace, cfg: TokenizerConfig, progress: bool = True) -> Tokenizer:
    """Train the BPE on the warehouse's train split (its first ``cfg.max_train_bytes`` if set)."""
    with warehouse.connect(ws, read_only=True) as con:
        n_docs = warehouse.split_counts(con).get("train", 0)
        if n_docs == 0:
            raise ValueError("the warehouse has no train documents to learn a tokenizer from: run ingest first")
        batches = split_batches(con, "train", cfg.batch_documents, cfg.max_train_bytes)
        return train_tokenizer(batches, cfg, length=None if cfg.max_train_bytes else n_docs, progress=progress)


def run_stage(ctx: StageContext) -> StageOutput:
    """The ``tokenizer`` stage: train BPE on the train split, save it, encode every split into shards."""
    cfg: TokenizerConfig = ctx.section("tokenizer")
    ws = ctx.workspace
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tok = train_from_warehouse(ws, cfg, progress=ctx.progress)
    train_seconds = time.perf_counter() - t0
    tok_path = ctx.out_dir / "tokenizer.json"
    tok_sha = save_tokenizer(tok, tok_path)

    t0 = time.perf_counter()
    shard_dir = ctx.out_dir / "shards"
    with warehouse.connect(ws, read_only=True) as con:
        meta = write_shards(con, tok, shard_dir, tok_sha, cfg.batch_documents, progress=ctx.progress)
    encode_seconds = time.perf_counter() - t0

    metrics = shard_metrics(meta)
    text_mb = sum(s["bytes"] - s["documents"] for s in meta["splits"].values()) / 1e6
    metrics.update({"tokens_processed": float(sum(s["tokens"] for s in meta["splits"].values())),
                    "train_seconds": train_seconds, "encode_seconds": encode_seconds,
                    "encode_mb_per_s": text_mb / max(encode_seconds, 1e-9)})
    ctx.log.metrics(metrics)
    ctx.log.artifact(tok_path)
    ctx.log.artifact(shard_dir / META_NAME, subdir="shards")

    digests = {name: file_sha256(shard_dir / name) for name in (*shard_files(meta), META_NAME)}
    fingerprint = hashlib.sha256(json.dumps({"tokenizer": tok_sha, "shards": digests}, sort_keys=True).encode())
    summary = (f"vocabulary {meta['vocab_size']}, {meta['splits']['train']['tokens']:,} train tokens, "
               f"{metrics.get('val_bytes_per_token', float('nan')):.2f} bytes/token on val")
    outputs = {"tokenizer": ws.rel(tok_path), "shards": ws.rel(shard_dir)}
    return StageOutput(fingerprint.hexdigest()[:32], outputs, metrics, summary)


def shard_metrics(meta: dict) -> dict[str, float]:
    """Tokens and documents per split, and each split's compression in bytes per token.

    Compression leaves out the end-of-text tokens and the one byte per document they stand for, so
    it measures the tokenizer on the text alone.
    """
    out: dict[str, float] = {"vocab_size": meta["vocab_size"]}
    for split, s in meta["splits"].items():
        out[f"tokens_{split}"] = s["tokens"]
        out[f"documents_{split}"] = s["documents"]
        if s["tokens"] > s["documents"]:
            out[f"{split}_bytes_per_token"] = (s["bytes"] - s["documents"]) / (s["tokens"] - s["documents"])
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def still_valid(ws: Workspace, result: StageResult) -> bool:
    """A cached result holds while its tokenizer file and every shard are intact."""
    shard_dir = ws.abs(result.outputs["shards"])
    try:
        meta = read_meta(shard_dir)
    except (OSError, ValueError):
        return False
    if file_sha256(ws.abs(result.outputs["tokenizer"])) != meta["tokenizer_sha256"]:
        return False
    return sizes_match(shard_dir, meta)
