"""ARPA export and import: round trips score identically; a hand-written file scores by hand."""

import math

import numpy as np
import pytest

from lmpipe import arpa, ngram
from lmpipe.arpa import ArpaWriter, read_arpa, write_arpa
from lmpipe.ngram_count import key_bits

CORPUS = [s.split() for s in ["a b c", "a b b", "b c a", "c a b c", "a a", "b"]]
CONTEXTS = [[], ["<s>"], ["a"], ["<s>", "a"], ["a", "b"], ["c", "c"], ["zzz", "b"], ["b", "zzz"]]


def _all_logprobs(model):
    return np.array([[model.logprob(w, ctx) for w in ("a", "b", "c", "</s>", "<unk>", "never")] for ctx in CONTEXTS])


@pytest.mark.parametrize("method", ["mle", "katz", "jm", "kn"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_round_trip_scores_identically(tmp_path, method, order):
    kw = {"lambdas": [0.8, 0.6, 0.5][:order]} if method == "jm" else {}
    model = ngram.fit(CORPUS, order, method, **kw)
    loaded = read_arpa(write_arpa(model, tmp_path / "m.arpa"))
    assert loaded.order == order
    np.testing.assert_array_equal(_all_logprobs(loaded), _all_logprobs(model))


@pytest.mark.parametrize("method", ["mle", "katz", "jm", "kn"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_streamed_export_matches_model_export(tmp_path, method, order):
    counts = ngram.count(CORPUS, 3)
    kw = {"lambdas": [0.8, 0.6, 0.5][:order]} if method == "jm" else {}
    before = set(counts.con.sql("SELECT table_name FROM information_schema.tables").fetchall())
    ngram.estimate_arpa(counts, order, method, tmp_path / "s.arpa", **kw)
    # sections are written while the estimate goes on, and every table or view it made is gone after
    assert set(counts.con.sql("SELECT table_name FROM information_schema.tables").fetchall()) == before
    streamed = read_arpa(tmp_path / "s.arpa")
    from_model = read_arpa(write_arpa(ngram.estimate(counts, order, method, **kw), tmp_path / "m.arpa"))
    assert streamed.order == order
    np.testing.assert_array_equal(_all_logprobs(streamed), _all_logprobs(from_model))


def test_add_k_exports_by_enumeration(tmp_path):
    model = ngram.fit(CORPUS, 2, "addk", k=0.5)
    loaded = read_arpa(write_arpa(ngram.addk_to_backoff(model), tmp_path / "addk.arpa"))
    np.testing.assert_allclose(_all_logprobs(loaded), _all_logprobs(model), rtol=1e-6)  # ARPA holds float32


def test_file_layout_and_log_zero(tmp_path):
    path = write_arpa(ngram.fit(CORPUS, 2, "mle"), tmp_path / "mle.arpa")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("\\data\\\nngram 1=6\nngram 2=")
    assert text.rstrip().endswith("\\end\\")
    lines = text.split("\\1-grams:\n")[1].split("\n\n")[0].splitlines()
    entries = {line.split("\t")[1]: line.split("\t") for line in lines}
    assert entries["<s>"][0] == "-99"  # <s> is never predicted
    assert entries["a"][2] == "-99"  # MLE: an unseen continuation of "a" has probability 0
    assert float(entries["a"][0]) == pytest.approx(math.log10(6 / 22))  # 16 words + 6 </s>


def test_hand_written_arpa_scores_by_hand(tmp_path):
    path = tmp_path / "hand.arpa"
    path.write_text(
        "\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n-1.0 <s> -0.3\n-0.5 a -0.2\n-0.7 </s>\n-2 <unk>\n\n"
        "\\2-grams:\n-0.1 <s> a\n-0.2 a </s>\n\n\\end\\\n", encoding="utf-8")
    model = read_arpa(path)
    assert model.logprob("a", ["<s>"]) == pytest.approx(-0.1)
    assert model.logprob("</s>", ["<s>"]) == pytest.approx(-0.3 - 0.7)  # bow(<s>) p(</s>)
    assert model.logprob("a", ["a"]) == pytest.approx(-0.2 - 0.5)
    assert model.logprob("b", ["a"]) == pytest.approx(-0.2 - 2)  # unknown word: bow(a) p(<unk>)
    assert model.sentence_logprob(["a"]) == pytest.approx(-0.1 - 0.2)


def _write_unigrams(path, logp, bow, words=None):
    words = words or [f"w{i}" for i in range(len(logp))]
    hi, lo = ngram.pack(np.arange(len(words))[:, None], key_bits(len(words)))
    with ArpaWriter(path, words, [len(words), 0]) as out:
        out.section(1)
        out.write(hi, lo, logp, bow)
        out.section(2)
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\\1-grams:\n")[1]
            .split("\n\n")[0].splitlines()]


def test_numbers_are_shortest_float32_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    values = np.concatenate([
        -rng.exponential(2.0, 5000), rng.normal(0, 1e-3, 2000), -10.0 ** rng.uniform(-9, 1.9, 2000),
        [1.5e5, 2.5e7, 99999.5, 1234567.0, 0.1, -0.001, 10.0, 100.0],  # integers, powers of ten
        [0.0, -0.5, -2.0, 1.25, -98.75, -1e-7, 3e-6]]).astype(np.float32)
    lines = _write_unigrams(tmp_path / "n.arpa", values, values[::-1].copy())
    written = np.array([float(p) for p, _, _ in lines], np.float32)
    np.testing.assert_array_equal(written, values)
    np.testing.assert_array_equal(np.array([float(b) for _, _, b in lines], np.float32), values[::-1])
    by_value = {float(v): p for v, (p, _, _) in zip(values[-7:], lines[-7:], strict=True)}
    assert by_value == {0.0: "0", -0.5: "-0.5", -2.0: "-2", 1.25: "1.25", -98.75: "-98.75",
                        float(np.float32(-1e-7)): "-0.0000001", float(np.float32(3e-6)): "0.000003"}
    assert max(len(p.lstrip("-").replace(".", "").lstrip("0")) for p, _, _ in lines) <= 9  # at most 9 digits


def test_log_zero_and_long_words(tmp_path):
    words = ["x" * 5000, "短", "<unk>"]
    lines = _write_unigrams(tmp_path / "z.arpa", np.array([-np.inf, -150.0, -1.5], np.float32),
                            np.zeros(3, np.float32), words)
    assert [(p, w) for p, w, _ in lines] == [("-99", words[0]), ("-99", "短"), ("-1.5", "<unk>")]


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "m.arpa"
    path.write_text("old model\n")
    hi, lo = ngram.pack(np.arange(3)[:, None], 2)
    with pytest.raises(ValueError, match="header says 4 n-grams, 3 were written"), \
            ArpaWriter(path, ["a", "b", "c"], [4]) as out:
        out.section(1)
        out.write(hi, lo, np.zeros(3, np.float32))
    assert path.read_text() == "old model\n"
    assert list(tmp_path.iterdir()) == [path]


def test_failed_disk_write_raises_and_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "m.arpa"
    path.write_text("old model\n")

    def full_disk(fh, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arpa, "_write_all", full_disk)
    hi, lo = ngram.pack(np.arange(3)[:, None], 2)
    with pytest.raises(OSError, match="No space left"), ArpaWriter(path, ["a", "b", "c"], [3]) as out:
        out.section(1)
        out.write(hi, lo, np.zeros(3, np.float32))
    assert path.read_text() == "old model\n"
    assert list(tmp_path.iterdir()) == [path]
