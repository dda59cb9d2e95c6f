"""ARPA files, the back-off language-model format that KenLM, SRILM and most toolkits read and write.

Layout: a ``\\data\\`` header with ``ngram k=count`` lines, then one ``\\k-grams:`` section per order whose
lines are ``log10 p<TAB>w1 ... wk[<TAB>log10 bow]`` (no back-off weight at the highest order), then
``\\end\\``. Probability 0 is written as -99, the convention for log10(0); reading maps -99 back to 0.
The body is written by DuckDB (``COPY``), which keeps export fast for models with millions of n-grams.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

from lmpipe.ngram_count import key_bits
from lmpipe.wordtok import SPECIALS, Vocabulary

if TYPE_CHECKING:
    from lmpipe.ngram import BackoffModel

LOG_ZERO = -99.0


def _number(expr: str) -> str:
    return f"CASE WHEN {expr} <= {LOG_ZERO} OR isinf({expr}) THEN '-99' ELSE ({expr})::VARCHAR END"


def arpa_line(logp: str, words: list[str], bow: str | None) -> str:
    """SQL expression of one ARPA line from SQL expressions for log10 p, the words and log10 bow (None: top order)."""
    line = f"{_number(logp)} || chr(9) || " + " || ' ' || ".join(words)
    return line + (f" || chr(9) || {_number(bow)}" if bow is not None else "")


def write_sections(con: duckdb.DuckDBPyConnection, sections: list[tuple[int, str]], path: Path) -> Path:
    """Write an ARPA file; ``sections[k-1]`` is (number of k-grams, a query of one column: the lines).

    Each section is streamed to disk by DuckDB's ``COPY``, so no order has to fit in Python's memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, open(path, "w", encoding="utf-8") as out:
        out.write("\\data\\\n" + "".join(f"ngram {k}={n}\n" for k, (n, _) in enumerate(sections, 1)))
        for k, (_, query) in enumerate(sections, 1):
            body = Path(tmp) / f"{k}.txt"
            con.execute(f"COPY ({query}) TO '{body}' (FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER chr(1))")
            out.write(f"\n\\{k}-grams:\n")
            with open(body, encoding="utf-8") as fh:
                shutil.copyfileobj(fh, out)
        out.write("\n\\end\\\n")
    return path


def write_arpa(model: BackoffModel, path: Path) -> Path:
    """Write ``model`` (whose tables keep their n-grams) as an ARPA file."""
    con = duckdb.connect()
    con.register("_words", pa.table({"words": [model.vocab.words]}))
    sections = []
    for k, table in enumerate(model.tables, 1):
        ids = table.ids
        columns = {f"w{j}": ids[:, j - 1] for j in range(1, k + 1)}
        con.register(f"_t{k}", pa.table({**columns, "logp": table.values["logp"], "bow": table.values["bow"]}))
        line = arpa_line("logp", [f"words[w{j} + 1]" for j in range(1, k + 1)], "bow" if k < model.order else None)
        sections.append((len(table), f"SELECT {line} FROM _t{k}, _words"))
    try:
        return write_sections(con, sections, path)
    finally:
        con.close()


def _value(text: str) -> float:
    v = float(text)
    return -np.inf if v <= LOG_ZERO else v


def read_arpa(path: Path, method: str = "arpa") -> BackoffModel:
    """Load an ARPA file as a :class:`BackoffModel` (vocabulary from its unigrams, ``<unk>`` added if absent)."""
    from lmpipe.ngram import BackoffModel, NgramTable  # lmpipe.ngram imports this module

    sections: list[list[tuple[float, list[str], float]]] = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if line.startswith("\\") and line.endswith("-grams:"):
                sections.append([])
            elif line == "\\end\\":
                break
            elif sections and line.strip():
                parts = line.split("\t") if "\t" in line else line.split()
                if "\t" in line:
                    words = parts[1].split()
                    bow = _value(parts[2]) if len(parts) > 2 else 0.0
                else:  # space-separated ARPA: the k words sit between the probability and the bow
                    k = len(sections)
                    words, bow = parts[1:1 + k], _value(parts[1 + k]) if len(parts) > 1 + k else 0.0
                sections[-1].append((_value(parts[0]), words, bow))
    unigram_words = [e[1][0] for e in sections[0]]
    vocab = Vocabulary([*SPECIALS, *(w for w in unigram_words if w not in SPECIALS)])
    tables = []
    for entries in sections:
        ids = np.array([[vocab.index[w] for w in e[1]] for e in entries], np.int64)
        logp = np.array([e[0] for e in entries], np.float32)
        bow = np.array([e[2] for e in entries], np.float32)
        if len(tables) == 0 and SPECIALS[0] not in unigram_words:  # no <unk> line: it gets probability 0
            ids, logp, bow = np.vstack([ids, [[0]]]), np.append(logp, -np.inf), np.append(bow, 0.0)
        tables.append(NgramTable.from_ids(ids, key_bits(len(vocab)), logp=logp, bow=bow))
    return BackoffModel(len(tables), vocab, tables, method)
