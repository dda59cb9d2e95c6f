import numpy as np
import pytest

from lmpipe.minhash import band_keys, estimated_jaccard, lsh_params, near_duplicates, signatures

P61 = (1 << 61) - 1


def reference_signature(text: str, num_perm: int, shingle: int = 5, seed: int = 0) -> list[int]:
    """The documented scheme, restated with Python integers (no 64-bit tricks)."""
    norm = " ".join(text.lower().split())
    if not norm:
        return [0xFFFFFFFF] * num_perm
    rng = np.random.default_rng(seed)
    a = [int(v) for v in rng.integers(1, P61, size=num_perm, dtype=np.uint64)]
    b = [int(v) for v in rng.integers(0, P61, size=num_perm, dtype=np.uint64)]
    xs = []
    for i in range(max(1, len(norm) - shingle + 1)):
        h = 0xCBF29CE484222325
        for ch in norm[i : i + shingle]:
            h = ((h ^ ord(ch)) * 0x100000001B3) % 2**64
        xs.append(h % P61)
    return [min(((a[j] * x + b[j]) % P61) & 0xFFFFFFFF for x in xs) for j in range(num_perm)]


def shingles(text: str, k: int = 5) -> set[str]:
    norm = " ".join(text.lower().split())
    return {norm[i : i + k] for i in range(len(norm) - k + 1)}


def make_text(seed: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    return " ".join("".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(n_words))


def replace_word(text: str, index: int, word: str) -> str:
    words = text.split()
    words[index] = word
    return " ".join(words)


# --- signatures -------------------------------------------------------------------------------------------------


def test_matches_reference_implementation():
    texts = ["The quick  brown\tfox jumps over the lazy dog.", "abc", "Ünïcödé ßtraße 🙂 emoji", "  \n "]
    sigs = signatures(texts, num_perm=16, seed=3)
    for text, sig in zip(texts, sigs, strict=True):
        assert sig.tolist() == reference_signature(text, 16, seed=3)


def test_shape_dtype_and_determinism():
    texts = [make_text(1), make_text(2), "short"]
    sigs = signatures(texts, num_perm=64)
    assert sigs.shape == (3, 64)
    assert sigs.dtype == np.uint32
    np.testing.assert_array_equal(sigs, signatures(texts, num_perm=64))
    # A text's signature does not depend on the rest of the batch.
    np.testing.assert_array_equal(sigs[1], signatures([texts[1]], num_perm=64)[0])
    other_seed = signatures(texts, num_perm=64, seed=1)
    assert estimated_jaccard(sigs[0], other_seed[0]) < 0.1


def test_empty_batch():
    assert signatures([], num_perm=8).shape == (0, 8)


def test_empty_and_whitespace_only_text():
    sigs = signatures(["", " \t\n "], num_perm=32)
    assert (sigs == 0xFFFFFFFF).all()


def test_normalisation_and_identical_texts():
    a, b = signatures(["Hello   World,\nthis is a Test", "hello world, this is a test"])
    np.testing.assert_array_equal(a, b)
    assert estimated_jaccard(a, b) == 1.0


def test_text_shorter_than_shingle_is_one_shingle():
    abc, abc2, abd = signatures(["abc", "ABC", "abd"], num_perm=64)
    np.testing.assert_array_equal(abc, abc2)
    assert (abc != 0xFFFFFFFF).all()
    assert estimated_jaccard(abc, abd) < 0.1


def test_unrelated_texts_have_low_estimate():
    a, b = signatures([make_text(10, 80), make_text(11, 80)])
    assert estimated_jaccard(a, b) < 0.1


def test_estimate_close_to_exact_jaccard():
    base = make_text(5, 80)
    words = base.split()
    # Keep the first 60 words and append 20 fresh ones: exact Jaccard near 0.6.
    other = " ".join(words[:60] + make_text(6, 20).split())
    sa, sb = shingles(base), shingles(other)
    exact = len(sa & sb) / len(sa | sb)
    assert 0.4 < exact < 0.8
    a, b = signatures([base, other], num_perm=256)
    assert abs(estimated_jaccard(a, b) - exact) < 0.1


def test_chinese_text():
    text = "自然语言处理是人工智能的一个重要分支，它研究如何让计算机理解和生成人类语言。"
    edited = text.replace("重要", "关键")
    unrelated = "今天天气很好，我们去公园散步，顺便买了一些水果和蔬菜回家做饭。"
    sigs = signatures([text, edited, unrelated], num_perm=256)
    assert (sigs != 0xFFFFFFFF).all()
    exact = len(shingles(text) & shingles(edited)) / len(shingles(text) | shingles(edited))
    assert abs(estimated_jaccard(sigs[0], sigs[1]) - exact) < 0.1
    assert estimated_jaccard(sigs[0], sigs[2]) < 0.1


def test_signature_arguments_are_validated():
    with pytest.raises(ValueError):
        signatures(["x"], num_perm=0)
    with pytest.raises(ValueError):
        signatures(["x"], shingle=0)


# --- estimated_jaccard / lsh_params / band_keys ------------------------------------------------------------------


def test_estimated_jaccard_counts_equal_positions():
    a = np.array([1, 2, 3, 4], dtype=np.uint32)
    b = np.array([1, 2, 0, 4], dtype=np.uint32)
    assert estimated_jaccard(a, b) == 0.75
    with pytest.raises(ValueError):
        estimated_jaccard(a, b[:3])


def test_lsh_params_hand_computed():
    # num_perm=2, t=0.8: error FP+FN is 0.340 for (1,1), 0.208 for (1,2) (P=s^2) and 0.472 for (2,1).
    assert lsh_params(2, 0.8) == (1, 2)
    # Mirror image (P_{2,1}(s) = 1 - P_{1,2}(1 - s)): at t=0.2 two bands of one row win.
    assert lsh_params(2, 0.2) == (2, 1)
    assert lsh_params(1, 0.5) == (1, 1)


@pytest.mark.parametrize("num_perm", [16, 128, 256])
def test_lsh_params_fit_and_move_with_threshold(num_perm):
    rows_seen = []
    for threshold in (0.3, 0.5, 0.7, 0.9):
        bands, rows = lsh_params(num_perm, threshold)
        assert bands >= 1 and rows >= 1 and bands * rows <= num_perm
        rows_seen.append(rows)
    assert rows_seen == sorted(rows_seen) and rows_seen[0] < rows_seen[-1]


def test_lsh_params_rejects_bad_threshold():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            lsh_params(128, bad)
    # At threshold 1 there is no false-negative mass left, so the fewest candidates win: one band of every row.
    assert lsh_params(16, 1.0) == (1, 16)


def test_band_keys():
    a = np.arange(8, dtype=np.uint32)
    b = a.copy()
    b[5] = 99  # band 1 of a 4x2 banding (positions 4, 5)
    same_bands = np.tile(np.array([7, 7], dtype=np.uint32), 4)
    keys = band_keys(np.stack([a, b, same_bands]), bands=4, rows=2)
    assert keys.shape == (3, 4) and keys.dtype == np.uint64
    assert (keys[0] == keys[1]).tolist() == [True, True, False, True]
    # Equal band contents at different band positions still give different keys.
    assert len(set(keys[2].tolist())) == 4
    with pytest.raises(ValueError):
        band_keys(np.stack([a]), bands=3, rows=3)
    with pytest.raises(TypeError):
        band_keys(np.stack([a]).astype(np.int64), bands=2, rows=2)


# --- near_duplicates -------------------------------------------------------------------------------------------

NUM_PERM = 128
THRESHOLD = 0.8
BANDS, ROWS = lsh_params(NUM_PERM, THRESHOLD)


@pytest.fixture(scope="module")
def corpus():
    texts = {name: make_text(seed, 55) for seed, name in enumerate("ABCD", start=100)}
    assert all(280 <= len(t) <= 330 for t in texts.values())  # about 300 characters each
    texts["A_edit"] = replace_word(texts["A"], 20, "changed")
    sa, sb = shingles(texts["A"]), shingles(texts["A_edit"])
    assert len(sa & sb) / len(sa | sb) > 0.85
    return {name: sig for name, sig in zip(texts, signatures(list(texts.values()), num_perm=NUM_PERM), strict=True)}


def dedup(corpus, batch, existing=None):
    sigs = np.stack([corpus[name] for name in batch])
    old = None if existing is None else np.stack([corpus[name] for name in existing])
    return near_duplicates(sigs, THRESHOLD, BANDS, ROWS, existing=old).tolist()


def test_planted_near_duplicate_is_flagged(corpus):
    assert dedup(corpus, ["A", "B", "C", "A_edit", "D"]) == [-1, -1, -1, 0, -1]


def test_first_occurrence_is_kept(corpus):
    assert dedup(corpus, ["B", "A_edit", "C", "A", "A"]) == [-1, -1, -1, 1, 1]


def test_duplicates_of_existing_use_existing_index(corpus):
    assert dedup(corpus, ["C", "A_edit", "D", "B"], existing=["A", "B"]) == [-1, 0, -1, 1]
    # Batch indices are offset by len(existing); a match in existing wins over an earlier batch copy.
    assert dedup(corpus, ["C", "D", "C"], existing=["A", "B"]) == [-1, -1, 2]
    assert dedup(corpus, ["A_edit", "A"], existing=["B", "A"]) == [1, 1]


def test_distinct_texts_are_kept(corpus):
    assert dedup(corpus, ["A", "B", "C", "D"]) == [-1, -1, -1, -1]
    no_batch = np.empty((0, NUM_PERM), dtype=np.uint32)
    # An empty `existing` matches nothing, whatever its width.
    only_a = corpus["A"][None]
    assert near_duplicates(only_a, THRESHOLD, BANDS, ROWS, existing=np.empty((0, 3), np.uint32)).tolist() == [-1]
    assert near_duplicates(no_batch, THRESHOLD, BANDS, ROWS, existing=corpus["A"][None]).tolist() == []


def test_empty_texts_duplicate_the_first():
    sigs = signatures(["", "some text here", ""])
    assert near_duplicates(sigs, THRESHOLD, BANDS, ROWS).tolist() == [-1, -1, 0]


def test_comparisons_only_against_kept_documents():
    # num_perm=8, one row per band. J(a, a1) = J(a1, a2) = 0.75 but J(a, a2) = 0.5: a1 is dropped as a copy of a,
    # and a2 is kept because the dropped a1 is not compared against.
    a = np.arange(8, dtype=np.uint32)
    a1 = a.copy()
    a1[:2] = 100
    a2 = a1.copy()
    a2[2:4] = 200
    assert near_duplicates(np.stack([a, a1, a2]), 0.75, bands=8, rows=1).tolist() == [-1, 0, -1]


def test_similar_pair_without_shared_band_is_not_a_candidate():
    # J = 0.75 >= threshold, but with 2 bands of 4 rows each band differs in one position: no shared key.
    a = np.arange(8, dtype=np.uint32)
    b = a.copy()
    b[[0, 4]] = 100
    assert near_duplicates(np.stack([a, b]), 0.5, bands=2, rows=4).tolist() == [-1, -1]
    assert near_duplicates(np.stack([a, b]), 0.5, bands=8, rows=1).tolist() == [-1, 0]


def test_matches_brute_force_on_random_signatures():
    rng = np.random.default_rng(7)
    n_existing, n, num_perm, bands, rows, threshold = 300, 1500, 32, 8, 4, 0.7
    all_sigs = rng.integers(0, 50, size=(n_existing + n, num_perm), dtype=np.uint32)
    # Plant copies with a few positions perturbed, so some pairs land just above and some just below threshold.
    src = rng.integers(0, n_existing + n // 2, size=400)
    dst = rng.integers(n_existing + n // 2, n_existing + n, size=400)
    noise = rng.random((400, num_perm)) < 0.25
    all_sigs[dst] = np.where(noise, rng.integers(50, 60, size=(400, num_perm)), all_sigs[src])
    existing, sigs = all_sigs[:n_existing], all_sigs[n_existing:]

    got = near_duplicates(sigs, threshold, bands, rows, existing=existing)

    keys = band_keys(all_sigs, bands, rows)
    kept = np.zeros(n_existing + n, dtype=bool)
    kept[:n_existing] = True
    expected = np.full(n, -1)
    for i in range(n_existing, n_existing + n):
        earlier = np.flatnonzero(kept[:i])
        candidates = earlier[(keys[earlier] == keys[i]).any(axis=1)]
        similar = candidates[(all_sigs[candidates] == all_sigs[i]).mean(axis=1) >= threshold]
        if len(similar):
            expected[i - n_existing] = similar.min()
        else:
            kept[i] = True
    np.testing.assert_array_equal(got, expected)
    assert 100 < np.count_nonzero(expected >= 0) < 400


def test_near_duplicates_validates_inputs():
    sigs = np.zeros((2, 8), dtype=np.uint32)
    with pytest.raises(ValueError):
        near_duplicates(sigs, 0.5, bands=3, rows=3)
    with pytest.raises(ValueError):
        near_duplicates(sigs, 0.5, bands=2, rows=4, existing=np.zeros((1, 4), dtype=np.uint32))
    with pytest.raises(ValueError):
        near_duplicates(sigs, 0.0, bands=2, rows=4)
    with pytest.raises(TypeError):
        near_duplicates(sigs.astype(np.float64), 0.5, bands=2, rows=4)
