"""Word vectors: the word2vec text and binary formats, projector TSVs, neighbours, analogies, similarity.

Formats (readable by word2vec.c's tools, gensim's ``KeyedVectors.load_word2vec_format`` and others):

- text: a header line ``V D``, then one line per word: the word and D numbers separated by spaces;
- binary: the same header, then per word the UTF-8 word, a space, D little-endian float32 and ``\\n``;
- projector: ``vectors.tsv`` (D tab-separated numbers per line) and ``metadata.tsv`` (one word per line),
  the pair that embedding projectors load.

Evaluation follows the usual protocol: analogies ``a : b :: c : d`` are answered by the word nearest to
b - a + c in cosine similarity among the most frequent words, a, b and c excluded (3CosAdd, Mikolov et al.
2013), skipping questions with a word outside that set; similarity files are scored by Spearman's ρ
between human scores and cosine similarities over the pairs whose words both have vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class WordVectors:
    """Words (most frequent first, if known) and their vectors, one row each."""

    words: list[str]
    vectors: np.ndarray  # (V, D) float32

    def __post_init__(self) -> None:
        if len(self.words) != len(self.vectors):
            raise ValueError(f"{len(self.words)} words but {len(self.vectors)} vectors")
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.index[word]]

    def unit(self) -> np.ndarray:
        """Rows scaled to unit length (zero rows stay zero)."""
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        return (self.vectors / np.where(norms > 0, norms, 1)).astype(np.float32)

    def nearest(self, word: str, k: int = 10, restrict: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` words with the highest cosine similarity to ``word`` (itself excluded)."""
        unit = self.unit()
        i = self.index[word]
        sims = unit[:restrict] @ unit[i]
        top = [j for j in np.argsort(-sims) if j != i][:k]
        return [(self.words[j], float(sims[j])) for j in top]


# ----------------------------------------------------------------------------------------------
# files


def save_text(wv: WordVectors, path: Path) -> Path:
    """word2vec text format."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{len(wv)} {wv.vectors.shape[1]}\n")
        for w, row in zip(wv.words, wv.vectors, strict=True):
            fh.write(w + " " + " ".join(f"{x:.6g}" for x in row) + "\n")
    return path


def load_text(path: Path) -> WordVectors:
    """Read the word2vec text format."""
    with open(path, encoding="utf-8") as fh:
        n, dim = (int(x) for x in fh.readline().split())
        words, rows = [], np.empty((n, dim), np.float32)
        for i in range(n):
            parts = fh.readline().rstrip("\n").split(" ")
            words.append(parts[0])
            rows[i] = np.array(parts[1 : dim + 1], np.float32)
    return WordVectors(words, rows)


def save_binary(wv: WordVectors, path: Path) -> Path:
    """word2vec binary format (float32, little-endian)."""
    vecs = np.ascontiguousarray(wv.vectors, dtype="<f4")
    with open(path, "wb") as fh:
        fh.write(f"{len(wv)} {vecs.shape[1]}\n".encode())
        for w, row in zip(wv.words, vecs, strict=True):
            fh.write(w.encode("utf-8") + b" " + row.tobytes() + b"\n")
    return path


def load_binary(path: Path) -> WordVectors:
    """Read the word2vec binary format (the newline after each vector is optional, as in word2vec.c)."""
    data = Path(path).read_bytes()
    end = data.index(b"\n")
    n, dim = (int(x) for x in data[:end].split())
    pos, words, rows = end + 1, [], np.empty((n, dim), np.float32)
    for i in range(n):
        while data[pos : pos + 1] in (b"\n", b" "):
            pos += 1
        space = data.index(b" ", pos)
        words.append(data[pos:space].decode("utf-8"))
        rows[i] = np.frombuffer(data, "<f4", dim, space + 1)
        pos = space + 1 + 4 * dim
    return WordVectors(words, rows)


def save_projector(wv: WordVectors, folder: Path, limit: int | None = None) -> tuple[Path, Path]:
    """``vectors.tsv`` and ``metadata.tsv`` for an embedding projector (the first ``limit`` words)."""
    folder.mkdir(parents=True, exist_ok=True)
    vec_path, meta_path = folder / "vectors.tsv", folder / "metadata.tsv"
    rows = wv.vectors[:limit]
    vec_path.write_text("".join("\t".join(f"{x:.6g}" for x in r) + "\n" for r in rows), encoding="utf-8")
    meta_path.write_text("".join(w + "\n" for w in wv.words[: len(rows)]), encoding="utf-8")
    return vec_path, meta_path


# ----------------------------------------------------------------------------------------------
# evaluation


def _case_folded(wv: WordVectors, restrict: int, case_insensitive: bool) -> tuple[dict[str, int], np.ndarray]:
    """Word → row among the ``restrict`` most frequent; folded to lower case, the most frequent spelling wins."""
    index: dict[str, int] = {}
    for i, w in enumerate(wv.words[:restrict]):
        index.setdefault(w.lower() if case_insensitive else w, i)
    return index, wv.unit()[:restrict]


def analogy_accuracy(wv: WordVectors, path: Path, restrict: int = 30000, case_insensitive: bool = True
                     ) -> dict[str, float]:
    """3CosAdd accuracy on a questions-words file: overall, per section, and the share of questions skipped."""
    index, unit = _case_folded(wv, restrict, case_insensitive)
    sections: dict[str, list[int]] = {}
    section, total, questions = "", 0, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        parts = line.lower().split() if case_insensitive else line.split()
        if len(parts) != 4:
            continue
        total += 1
        if all(p in index for p in parts):
            questions.append((section, [index[p] for p in parts]))
    for b0 in range(0, len(questions), 512):  # batched: one matrix product per 512 questions
        batch = questions[b0 : b0 + 512]
        q = np.array([ids for _, ids in batch])
        target = unit[q[:, 1]] - unit[q[:, 0]] + unit[q[:, 2]]
        sims = target @ unit.T
        np.put_along_axis(sims, q[:, :3], -np.inf, axis=1)
        guess = sims.argmax(1)
        for (sec, ids), g in zip(batch, guess, strict=True):
            sections.setdefault(sec, [0, 0])
            sections[sec][0] += int(g == ids[3])
            sections[sec][1] += 1
    correct, answered = sum(c for c, _ in sections.values()), len(questions)
    out = {"accuracy": correct / answered if answered else 0.0, "questions": float(total),
           "answered": float(answered), "oov_share": 1 - answered / total if total else 0.0}
    out |= {f"section.{s}": c / n for s, (c, n) in sections.items()}
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def similarity_spearman(wv: WordVectors, path: Path, case_insensitive: bool = True) -> dict[str, float]:
    """Spearman ρ between a file's scores (word1 TAB word2 TAB score; ``#`` comments) and cosine similarity."""
    index, unit = _case_folded(wv, len(wv), case_insensitive)
    human, model, total = [], [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) < 3:
            continue
        try:
            score = float(parts[2])
        except ValueError:
            continue  # a header line
        total += 1
        a, b = (p.strip().lower() if case_insensitive else p.strip() for p in parts[:2])
        if a in index and b in index:
            human.append(score)
            model.append(float(unit[index[a]] @ unit[index[b]]))
    rho = spearman(human, model) if len(human) > 1 else float("nan")
    return {"spearman": rho, "pairs": float(total), "used": float(len(human)),
            "oov_share": 1 - len(human) / total if total else 0.0}


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows (centred, by SVD)."""
    x = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def plot_pca(wv: WordVectors, path: Path, n_words: int = 200, title: str = "") -> Path:
    """A PNG of the ``n_words`` first (most frequent) words projected on their first two principal components."""
    from lmpipe import plots

    plt = plots._pyplot()
    n = min(n_words, len(wv))
    xy = pca_2d(wv.vectors[:n].astype(np.float64))
    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5)
    fonts = plots.label_fonts()  # a CJK font where one is installed, for words DejaVu Sans cannot draw
    for (x, y), w in zip(xy, wv.words[:n], strict=True):
        ax.annotate(w, (x, y), fontsize=6, alpha=0.8, fontfamily=fonts)
    ax.set_title(title or f"PCA of the {n} most frequent words")
    plots.save(fig, path)
    plt.close(fig)
    return path
