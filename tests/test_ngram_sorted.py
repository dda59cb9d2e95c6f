"""The sorted Kneser-Ney engine: the same numbers as the SQL estimator, its radix sort, and when it is used."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from lmpipe import ngram, ngram_sorted, wordtok
from lmpipe.arpa import read_arpa


def _corpus(seed: int, n: int, words: int = 12) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(words)]
    # a skewed word distribution, so that counts 1, 2, 3 and more all occur in every order
    return [[vocab[min(int(rng.expovariate(0.4)), words - 1)] for _ in range(rng.randint(1, 9))] for _ in range(n)]


def _tables(model: ngram.BackoffModel) -> list[dict[str, np.ndarray]]:
    return [{"keys": t.keys, "logp": t.values["logp"], "bow": t.values["bow"]} for t in model.tables]


@pytest.mark.parametrize(("order", "counted", "n"), [(1, 3, 200), (2, 2, 200), (3, 5, 300), (5, 5, 400), (4, 4, 3)])
def test_same_numbers_as_sql(order, counted, n):
    """Every probability and back-off weight, bit for bit, also for an order below the counted one (its top
    order uses raw counts) and on a corpus so small that the discounts fall back."""
    counts = ngram.count(_corpus(seed=order, n=n), counted, min_count=2)
    sql = ngram.estimate(counts, order, "kn", engine="sql")
    fast = ngram.estimate(counts, order, "kn", engine="sorted")
    assert fast.notes.pop("kn_sorted_engine") == 1.0 and sql.notes.pop("kn_sorted_engine") == 0.0
    assert fast.notes == sql.notes
    if n == 3:
        assert any(v == 1.0 for k, v in fast.notes.items() if k.startswith("kn_fallback"))
    for a, b in zip(_tables(fast), _tables(sql), strict=True):
        for name in ("keys", "logp", "bow"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    counts.con.close()


def test_same_arpa_file_as_sql(tmp_path):
    """The ARPA files hold the same lines; within a section the sorted engine writes in key order."""
    counts = ngram.count(_corpus(seed=11, n=300), 4)
    paths = {e: tmp_path / f"{e}.arpa" for e in ("sql", "sorted")}
    notes = {e: ngram.estimate_arpa(counts, 4, "kn", p, engine=e) for e, p in paths.items()}
    assert notes["sql"] == notes["sorted"] | {"kn_sorted_engine": 0.0}

    def sections(path):
        text = path.read_text(encoding="utf-8")
        return [sorted(part.strip().splitlines()) for part in text.split("\\")]

    assert sections(paths["sql"]) == sections(paths["sorted"])
    loaded = read_arpa(paths["sorted"])
    model = ngram.estimate(counts, 4, "kn")
    for ctx in (["<s>", "w0"], ["w1", "w0", "w2"], ["zzz", "w3"]):
        for w in ("w0", "w5", "</s>", "<unk>"):
            assert loaded.logprob(w, ctx) == pytest.approx(model.logprob(w, ctx), abs=1e-6)
    counts.con.close()


def test_radix_sort_orders_128_bit_keys_and_carries_the_bits_above():
    rng = np.random.default_rng(0)
    n, key_bits = 50_000, 95
    lo = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    hi = rng.integers(0, 2**31, n, dtype=np.uint64)  # key bits 64..94
    hi[: n // 2] = hi[n // 2:]  # many equal high halves: the low digits decide
    payload = rng.integers(0, 2**33, n, dtype=np.uint64)
    packed = hi | (payload << np.uint64(key_bits - 64))
    out_hi, out_lo = ngram_sorted._radix_sort(packed.copy(), lo.copy(), key_bits)
    order = np.lexsort((lo, hi))
    np.testing.assert_array_equal(out_lo, lo[order])
    np.testing.assert_array_equal(out_hi, packed[order])  # stable: equal keys keep their order, payload intact


def test_argsort_keys_is_a_stable_argsort():
    keys = np.random.default_rng(1).integers(0, 1000, 20_000).astype(np.uint64) * np.uint64(2**50)
    out, perm = ngram_sorted.argsort_keys(keys)
    np.testing.assert_array_equal(perm, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(out, np.sort(keys))


def test_auto_engine_falls_back_to_sql_under_a_small_memory_limit(monkeypatch):
    counts = ngram.count(_corpus(seed=2, n=100), 3)
    counts.con.execute("SET memory_limit = '4GB'")
    assert ngram._sorted_engine(counts, 3, "kn", "auto")
    assert not ngram._sorted_engine(counts, 3, "katz", "auto")
    monkeypatch.setattr(ngram_sorted, "memory_needed", lambda ngrams, order: 5 * 10**9)
    assert not ngram._sorted_engine(counts, 3, "kn", "auto")  # more than the limit: SQL, which spills
    assert ngram._sorted_engine(counts, 3, "kn", "sorted")  # asked for by name: no budget check
    counts.con.close()


def test_duckdb_limit_is_shared_while_sorted_arrays_are_held_and_restored_after():
    counts = ngram.count(_corpus(seed=2, n=100), 3)
    counts.con.execute("SET memory_limit = '3GB'")
    reported = counts.con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    before = ngram._memory_limit(counts.con)
    need = ngram_sorted.memory_needed(counts.ngrams, 3)
    for _ in range(3):  # the limit comes back each time, without drifting
        seen = [ngram._memory_limit(counts.con) for _ in ngram._kn_sorted(counts, 3, {})]
        assert seen and all(before - need - (108 << 20) <= v <= before - need for v in seen)  # reported to 0.1 GiB
        assert counts.con.sql("SELECT current_setting('memory_limit')").fetchall()[0][0] == reported
    assert abs(ngram._memory_limit(counts.con, middle=True) - 3e9) < 0.05 * 2**30
    counts.con.close()


def test_engine_errors():
    counts = ngram.count(_corpus(seed=2, n=50), 3)
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        ngram.estimate(counts, 3, "kn", engine="fast")
    with pytest.raises(ValueError, match="Kneser-Ney only, not katz"):
        ngram.estimate(counts, 3, "katz", engine="sorted")
    counts.con.close()


def test_counts_too_large_for_the_keys_spare_bits_use_sql():
    """Each count rides in the bits its order's key leaves free: 6-grams of 20-bit ids leave 8."""
    counts = ngram.count([["a"] * 300], 2)
    wide = SimpleNamespace(con=counts.con, prefix=counts.prefix, bits=20)
    assert not ngram_sorted.fits(wide, 6)  # "a" was seen 300 times, more than 2**8
    assert ngram_sorted.fits(wide, 5)  # 100 bits leave 28
    counts.con.close()


def test_inconsistent_counts_are_an_error():
    counts = ngram.count(_corpus(seed=5, n=200), 3)
    counts.con.execute(f"DELETE FROM {counts.prefix}_g2 WHERE key = (SELECT max(key) FROM {counts.prefix}_c2)")
    counts.ngrams[2] -= 1
    with pytest.raises(ValueError, match="counts are inconsistent"):
        ngram.estimate(counts, 3, "kn", engine="sorted")
    counts.con.close()


def test_vocabulary_with_unseen_words_keeps_every_type(tmp_path):
    """Unigrams are every type of the vocabulary, seen or not, as in the SQL estimator."""
    corpus = _corpus(seed=8, n=60)
    vocab = wordtok.Vocabulary([*wordtok.SPECIALS, *sorted({w for s in corpus for w in s}), "never1", "never2"])
    counts = ngram.count(corpus, 3, vocab=vocab)
    model = ngram.estimate(counts, 3, "kn", engine="sorted")
    assert len(model.tables[0]) == len(vocab)
    assert model.prob("never1") > 0 and model.prob("<s>") == 0
    assert sum(model.next_word_distribution(["w0", "w1"]).values()) == pytest.approx(1.0, abs=1e-5)
    counts.con.close()


def test_memory_share_goes_on_when_duckdb_cannot_lower_its_limit():
    """Where DuckDB cannot evict enough to meet the lower limit, the estimate runs at the user's limit."""
    import duckdb

    class Refusing:
        def __init__(self, con):
            self.con, self.sets = con, []

        def sql(self, query):
            return self.con.sql(query)

        def execute(self, query):
            self.sets.append(query)
            if len(self.sets) == 1:
                raise duckdb.OutOfMemoryException("could not free up enough memory")
            return self.con.execute(query)

    con = duckdb.connect()
    con.execute("SET memory_limit = '2GB'")
    before = ngram._memory_limit(con)
    refusing = Refusing(con)
    with ngram._MemoryShare(refusing, 1 << 30):
        assert ngram._memory_limit(con) == before
    assert len(refusing.sets) == 1 and ngram._memory_limit(con) == before  # nothing to restore
    con.close()


@pytest.mark.parametrize("corpus", [[[], []], [["a"], []]])
def test_orders_without_ngrams(corpus):
    """Empty sentences leave the higher orders with no n-grams at all: both engines still agree."""
    counts = ngram.count(corpus, 4)
    assert counts.ngrams[4] == 0
    sql, fast = (ngram.estimate(counts, 4, "kn", engine=e) for e in ("sql", "sorted"))
    for a, b in zip(_tables(fast), _tables(sql), strict=True):
        for name in ("keys", "logp", "bow"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sum(fast.next_word_distribution(["<s>"]).values()) == pytest.approx(1.0, abs=1e-5)
    counts.con.close()
