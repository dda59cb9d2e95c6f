"""The triton word2vec engine, run by Triton's interpreter on the CPU: its kernel must reproduce the numba kernel.

The interpreter has to be chosen before triton is imported (TRITON_INTERPRET=1), and other tests may import
triton first (PyTorch's compiler looks for it), so the checks run in a fresh interpreter process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from lmpipe import word2vec as w2v


def test_missing_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "lmpipe.word2vec_triton", raising=False)
    s = w2v.Word2VecSettings(dim=4, epochs=1, min_count=1, engine="triton")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        w2v.train([["a", "b", "c"]] * 3, s)
    with pytest.raises(ValueError, match="unknown engine 'cuda'"):
        w2v.train([["a", "b", "c"]] * 3, w2v.Word2VecSettings(dim=4, epochs=1, min_count=1, engine="cuda"))


@pytest.fixture(scope="module")
def triton():
    return pytest.importorskip("triton")


SCRIPT = r"""
import json
import numba
import numpy as np
import torch
from lmpipe import word2vec as w2v, word2vec_triton as wt

numba.set_num_threads(1)
rng = np.random.default_rng(0)
sents = [[f"w{int(x)}" for x in rng.integers(0, 20, rng.integers(1, 10))] for _ in range(14)]
counts = {}
for sent in sents:
    for w in sent:
        counts[w] = counts.get(w, 0) + 1
words, freq = w2v.build_vocab(counts, 1)
ids, starts = w2v.encode_corpus(sents, {w: i for i, w in enumerate(words)})
result = {"kernel": {}}


# 1. one kernel call, one chunk: the same updates as the numba kernel, for every variant
for sg, hs in ((True, False), (False, False), (True, True), (False, True)):
    s = w2v.Word2VecSettings(sg=sg, hs=hs, dim=12, window=3, negative=3, sample=0.0, min_count=1)
    codes, points, lengths, table = w2v.output_tables(freq, hs)
    r = np.random.default_rng(1)
    syn0 = ((r.random((len(words), 12), dtype=np.float32) - 0.5) / 12).astype(np.float32)
    syn1 = (r.random((len(words), 12), dtype=np.float32) * 0.1).astype(np.float32)
    a0, a1 = syn0.copy(), syn1.copy()
    first, end, before = np.array([0]), np.array([len(starts) - 1]), np.array([0])
    ref = w2v._train_chunks(ids, starts, first, end, before, np.ones(len(words), np.float32), a0, a1, a1, codes,
                            points, lengths, table, sg, True, 3, 3, hs, s.start_alpha,
                            s.start_alpha * s.min_alpha_ratio, 1000, 5)
    b0, b1 = torch.from_numpy(syn0.copy()), torch.from_numpy(syn1.copy())
    t = wt.device_tables(codes, points, lengths, table, "cpu")
    st = torch.from_numpy(starts)
    got = wt.launch(torch.from_numpy(ids), st, st, torch.from_numpy(first), torch.from_numpy(end),
                    torch.from_numpy(before), t, b0, b1, s, 1000, 5)
    result["kernel"][s.name] = {
        "ref": ref.ravel().tolist(), "got": got.numpy().ravel().tolist(),
        "syn0_diff": float(np.abs(a0 - b0.numpy()).max()), "syn1_diff": float(np.abs(a1 - b1.numpy()).max()),
        "syn0_moved": float(np.abs(a0 - syn0).max()), "syn1_moved": float(np.abs(a1 - syn1).max())}

# 2. train(): the engine's schedule (parts, chunks, learning rate, seeds per epoch) against the numba kernel
# driven through the same schedule
s = w2v.Word2VecSettings(dim=10, window=2, negative=2, sample=0.0, min_count=1, epochs=2, seed=4, streams=2,
                         engine="triton", device="cpu", report_words=1)
reports = []
model = w2v.train(sents, s, progress=reports.append)
ref = w2v.train(sents, w2v.Word2VecSettings(**{**s.__dict__, "epochs": 0}))
codes, points, lengths, table = w2v.output_tables(freq, False)
schedule = w2v.Schedule(starts, max(1, int(starts[-1]) // (2 * wt.LAUNCHES_PER_EPOCH)), 2, 2)
examples = 0.0
for epoch in range(2):
    for first, end, before in schedule.epoch(1):
        out = w2v._train_chunks(ids, starts, first, end, before, np.ones(len(words), np.float32), ref.syn0, ref.syn1,
                                ref.syn1, codes, points, lengths, table, True, True, 2, 2, False, 0.025,
                                0.0000025, schedule.total, 4 + epoch * 100_003)
        examples += out[:, 1].sum()
result["train"] = {"diff": float(np.abs(model.syn0 - ref.syn0).max()), "epochs": len(model.history),
                   "examples": sum(h["examples"] for h in model.history), "ref_examples": float(examples),
                   "reports": len(reports), "last_progress": reports[-1]["progress"]}

# 3. subsampling: fewer words trained, every sentence's kept words in order
ids_t = torch.tensor([0, 1, 2, 0, 3, 0], dtype=torch.int32)
sent_t = torch.tensor([0, 0, 0, 1, 1, 2])
gen = torch.Generator().manual_seed(0)
kids, kstarts = wt.subsample(ids_t, sent_t, torch.tensor([0.0, 1.0, 1.0, 1.0]), 3, gen)
result["subsample"] = {"ids": kids.tolist(), "starts": kstarts.tolist()}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def interpreted(triton) -> dict:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["sg-ns", "cbow-ns", "sg-hs", "cbow-hs"])
def test_kernel_reproduces_the_numba_kernel(interpreted: dict, variant: str) -> None:
    r = interpreted["kernel"][variant]
    assert r["syn0_moved"] > 1e-3 and r["syn1_moved"] > 1e-3  # training changed both matrices...
    assert r["syn0_diff"] < 1e-6 and r["syn1_diff"] < 1e-6  # ...exactly as the numba kernel did
    loss, examples, words = r["got"]
    assert examples == r["ref"][1] and words == r["ref"][2]
    assert loss == pytest.approx(r["ref"][0], rel=1e-5)


def test_train_follows_the_shared_schedule(interpreted: dict) -> None:
    r = interpreted["train"]
    assert r["epochs"] == 2
    assert r["diff"] < 1e-6
    assert r["examples"] == r["ref_examples"] > 0
    assert r["reports"] >= 2 and r["last_progress"] == 1.0


def test_subsample_keeps_sentence_bounds(interpreted: dict) -> None:
    # word 0 is always dropped (keep 0), the others always kept (keep 1)
    assert interpreted["subsample"] == {"ids": [1, 2, 3], "starts": [0, 2, 3, 3]}


def test_interpreter_mismatch_is_a_clear_error(triton) -> None:
    from lmpipe import word2vec_triton

    if triton.knobs.runtime.interpret:
        pytest.skip("this process runs triton interpreted")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        word2vec_triton.kernel(True)


@pytest.mark.parametrize("sg, hs", [(True, False), (False, True)])
def test_kernel_compiles_for_a_cuda_gpu(triton, sg: bool, hs: bool) -> None:
    """Compiled for an H100 (sm_90) without one: Triton's own compiler and ptxas. The scalar arguments are given as
    the constexpr 1 that Triton makes of an argument equal to 1 where it specialises (the default seed is 1)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmpipe import word2vec_triton

    if triton.knobs.runtime.interpret:
        pytest.skip("this process runs triton interpreted")
    fn = word2vec_triton.kernel(False)
    assert {p.name for p in fn.params if p.do_not_specialize} == {"table_size", "words_total", "seed"}
    pointers = {"kids": "*i32", "kstarts": "*i64", "starts": "*i64", "first": "*i64", "end": "*i64",
                "before": "*i64", "table": "*i32", "syn0": "*fp32", "syn1": "*fp32", "codes": "*u8",
                "points": "*i32", "lengths": "*i32", "out": "*fp32", "alpha0": "fp32", "alpha_end": "fp32"}
    constants = {"table_size": 1, "words_total": 1, "seed": 1, "DIM": 100, "BLOCK": 128, "SG": sg, "HS": hs,
                 "NEG": 5, "CBOW_MEAN": True, "WINDOW": 5, "MAX_CODE": 40}
    signature = pointers | {name: "constexpr" for name in constants}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()})
    options = {"num_warps": 1, "enable_fp_fusion": True}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert len(compiled.asm["cubin"]) > 1000
    # Hogwild across multiprocessors: the masked loads are the rows of syn0 and syn1, which other programs change;
    # each must read through L2 (.cg), never a multiprocessor's own possibly stale L1 copy, and each change must be
    # an atomic add, never a write of the row as read plus the change (which loses a concurrent program's update)
    ptx = [line.strip() for line in compiled.asm["ptx"].splitlines()]
    row_loads = [line for line in ptx if line.startswith("@%p") and " ld.global" in line]
    assert len(row_loads) >= 2
    assert all(" ld.global.cg." in line for line in row_loads), row_loads
    # (Triton 3.8 writes atom.global...; 3.9 red.global..., the same add without a returned value)
    assert sum(bool(re.search(r"\b(atom|red)\.global\.gpu\.relaxed\.add\.f32\b", line)) for line in ptx) >= 2
    assert sum("st.global" in line for line in ptx) == 3  # the program's three sums (loss, examples, words) only


def test_auto_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: numba on the CPU, the triton kernel on CUDA where triton is installed, the batched engine elsewhere."""
    settings = w2v.Word2VecSettings()
    assert w2v.resolve_engine(settings) == "numba"
    assert w2v.resolve_engine(dataclasses.replace(settings, engine="torch")) == "torch"
    monkeypatch.setitem(sys.modules, "triton", None)  # as where triton is not installed
    assert w2v.resolve_engine(dataclasses.replace(settings, device="cuda")) == "torch"
    assert w2v.resolve_engine(dataclasses.replace(settings, device="cuda", engine="triton")) == "triton"
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert w2v.resolve_engine(dataclasses.replace(settings, device="cuda:1")) == "triton"
    assert w2v.resolve_engine(dataclasses.replace(settings, device="mps")) == "torch"
