"""Word-vector files, neighbours, analogy accuracy, Spearman correlation and the PCA plot."""

import math

import numpy as np
import pytest

from lmpipe import vectors
from lmpipe.vectors import WordVectors


@pytest.fixture
def wv():
    words = ["king", "queen", "man", "woman", "Paris", "été", "x"]
    rng = np.random.default_rng(0)
    return WordVectors(words, rng.normal(size=(len(words), 5)).astype(np.float32))


def test_text_and_binary_round_trip(tmp_path, wv):
    text = vectors.load_text(vectors.save_text(wv, tmp_path / "v.txt"))
    assert text.words == wv.words
    np.testing.assert_allclose(text.vectors, wv.vectors, rtol=1e-5)
    binary = vectors.load_binary(vectors.save_binary(wv, tmp_path / "v.bin"))
    assert binary.words == wv.words
    np.testing.assert_array_equal(binary.vectors, wv.vectors)  # float32 bytes: exact
    header, first = (tmp_path / "v.txt").read_text(encoding="utf-8").splitlines()[:2]
    assert header == "7 5" and first.split()[0] == "king" and len(first.split()) == 6
    raw = (tmp_path / "v.bin").read_bytes()
    assert raw.startswith(b"7 5\nking ") and len(raw) == len(b"7 5\n") + sum(
        len(w.encode()) + 1 + 4 * 5 + 1 for w in wv.words)


def test_binary_reader_accepts_vectors_without_newlines(tmp_path):
    vecs = np.arange(6, dtype="<f4").reshape(2, 3)
    (tmp_path / "v.bin").write_bytes(b"2 3\na " + vecs[0].tobytes() + b"b " + vecs[1].tobytes())
    back = vectors.load_binary(tmp_path / "v.bin")
    assert back.words == ["a", "b"] and back.vectors.tolist() == vecs.tolist()


def test_projector_files(tmp_path, wv):
    vec_path, meta_path = vectors.save_projector(wv, tmp_path / "proj", limit=3)
    rows = vec_path.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and len(rows[0].split("\t")) == 5
    assert meta_path.read_text(encoding="utf-8").splitlines() == ["king", "queen", "man"]


def test_nearest_neighbours_by_cosine():
    wv = WordVectors(["a", "b", "c", "d"], np.array([[1, 0], [10, 1], [0, 1], [-1, 0]], np.float32))
    near = wv.nearest("a", 3)
    assert [w for w, _ in near] == ["b", "c", "d"]
    assert near[0][1] == pytest.approx(10 / math.sqrt(101)) and near[2][1] == pytest.approx(-1)
    assert [w for w, _ in wv.nearest("a", 3, restrict=2)] == ["b"]  # only the 2 most frequent words


def _analogy_vectors():
    # man=(1,0,0), woman=(1,1,0), king=(1,0,1), queen=(1,1,1): king - man + woman = queen exactly
    words = ["man", "woman", "king", "queen", "Paris", "France", "Rome", "apple"]
    vecs = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1],
                     [0, 0, 1], [0, 1, 1], [0.1, 0, 1], [0, -1, 0]], np.float32)
    return WordVectors(words, vecs)


def test_analogy_accuracy_counts_sections_and_skipped_questions(tmp_path):
    path = tmp_path / "questions-words.txt"
    path.write_text(": family\nman woman king queen\nMan Woman King Queen\n: capitals\nParis France Rome Italy\n"
                    "man woman Paris Rome\n", encoding="utf-8")
    out = vectors.analogy_accuracy(_analogy_vectors(), path)
    # question 1 and its capitalised copy are right (queen: cos 1.055/|t| against France's 1.0/|t|); "Italy" is
    # missing; the last: woman - man + Paris (unit vectors) = (-0.29, 0.71, 1) is nearest France (1.21/|t|), not
    # Rome (0.97/|t|)
    assert out["questions"] == 4 and out["answered"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3) and out["oov_share"] == pytest.approx(1 / 4)
    assert out["section.family"] == 1.0 and out["section.capitals"] == 0.0
    assert vectors.analogy_accuracy(_analogy_vectors(), path, restrict=3)["answered"] == 0  # queen not in top 3


def test_spearman_by_hand():
    # ranks 1 2 3 4 vs 1 3 2 4: d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6*2 / (4*15) = 0.8
    assert vectors.spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert vectors.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share the average rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> Pearson of the ranks
    a, b = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    a, b = a - a.mean(), b - b.mean()
    expected = (a * b).sum() / math.sqrt((a**2).sum() * (b**2).sum())
    assert vectors.spearman([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(expected)


def test_similarity_file_with_oov_share(tmp_path):
    path = tmp_path / "sim.tsv"
    path.write_text("# word1\tword2\tscore\nWord 1\tWord 2\tHuman (mean)\nking\tqueen\t9\nman\twoman\t8\n"
                    "king\tapple\t1\nking\tunicorn\t5\n", encoding="utf-8")
    out = vectors.similarity_spearman(_analogy_vectors(), path)
    assert out["pairs"] == 4 and out["used"] == 3 and out["oov_share"] == pytest.approx(0.25)
    # cosines: king-queen 2/sqrt(6) = 0.816, man-woman 1/sqrt(2) = 0.707, king-apple 0: same order as the scores
    assert out["spearman"] == pytest.approx(1.0)


def test_pca_projection_and_plot(tmp_path, wv):
    x = np.array([[0, 0, 0], [2, 2, 0], [4, 4, 0.1]])
    xy = vectors.pca_2d(x)
    assert abs(xy[:, 0]).max() == pytest.approx(math.sqrt(8), rel=1e-3)  # spread along (1, 1, 0)/sqrt(2)
    png = vectors.plot_pca(wv, tmp_path / "pca.png", n_words=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cjk_labels_use_an_installed_cjk_font_or_give_one_warning(tmp_path):
    import warnings

    from lmpipe import plots

    assert plots.label_fonts({"Liberation Serif", "WenQuanYi Zen Hei", "Noto Sans CJK SC"}) == [
        "DejaVu Sans", "Noto Sans CJK SC", "WenQuanYi Zen Hei"]  # in CJK_FAMILIES' order
    assert plots.label_fonts(set()) == ["DejaVu Sans"]
    wv = WordVectors(["我", "吃", "苹果", "the"], np.eye(4, dtype=np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = vectors.plot_pca(wv, tmp_path / "pca.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    messages = [str(w.message) for w in caught]
    if len(plots.label_fonts()) > 1:  # a CJK font is installed: every label has its glyphs
        assert messages == []
    else:  # one warning for the plot, not one per glyph, naming the characters drawn as boxes
        assert len(messages) == 1 and messages[0].startswith("pca.png: 4 characters have no glyph")
