"""Ingestion into the warehouse: formats, cleaning, exact and near dedup, splits, idempotency, bad input."""

from __future__ import annotations

import gzip
import json

import duckdb
import pytest
import zstandard

from lmpipe import warehouse
from lmpipe.clean import normalize
from lmpipe.config import IngestConfig
from lmpipe.corpus import ingest, split_of, text_hash
from lmpipe.sources import IngestError

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs, said the sphinx.",
    "How vexingly quick daft zebras jump over the fence!",
    "我吃苹果。我喝可乐。今天天气很好，我们去公园散步吧。",
]


def _docs(ws, where="TRUE"):
    with warehouse.connect(ws, read_only=True) as con:
        return con.sql(f"SELECT text, split, line, source_id FROM documents WHERE {where} ORDER BY doc_id").fetchall()


def _drops(ws):
    with warehouse.connect(ws, read_only=True) as con:
        return dict(con.sql("SELECT reason, sum(count)::BIGINT FROM drops GROUP BY reason").fetchall())


def _ingest(ws, *paths, **cfg):
    return ingest(ws, IngestConfig(sources=tuple(str(p) for p in paths), **cfg), progress=False)


def _write_formats(d):
    (d / "a.txt").write_text("\n".join(LINES[:2]) + "\n", encoding="utf-8")
    (d / "b.md").write_text(LINES[2] + "\n", encoding="utf-8")
    (d / "c.jsonl.gz").write_bytes(gzip.compress((json.dumps({"body": LINES[3]}, ensure_ascii=False) + "\n").encode()))
    rows = [{"body": "A json array record with enough text to keep."}]
    (d / "d.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps(rows).encode()))
    con = duckdb.connect()
    con.execute(f"COPY (SELECT 'A parquet row with enough text to keep.' AS body) TO '{d / 'e.parquet'}'")
    con.execute(f"COPY (SELECT 'A csv row, with a comma, and enough text.' AS body) TO '{d / 'f.csv'}' (HEADER)")
    con.close()


def test_every_format_lands_in_the_warehouse(workspace, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_formats(d)
    (d / "a.txt").unlink()  # .txt/.md use the line unit; the rest use the configured field
    (d / "b.md").unlink()
    report = _ingest(workspace, d, text_field="body")
    texts = {t for t, *_ in _docs(workspace)}
    assert texts == {normalize(LINES[3]), "A json array record with enough text to keep.",
                     "A parquet row with enough text to keep.", "A csv row, with a comma, and enough text."}
    assert {s.status for s in report.sources} == {"ingested"} and len(report.sources) == 4
    with warehouse.connect(workspace, read_only=True) as con:
        sources = con.sql("SELECT uri, format, read, documents, length(sha256) FROM sources ORDER BY uri").fetchall()
    assert [s[1] for s in sources] == ["jsonl", "json", "parquet", "csv"]
    assert all(s[2] == s[3] == 1 and s[4] == 64 for s in sources)


def test_text_units_line_and_paragraph(workspace, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("First paragraph, line one,\nand line two.\n\n\nSecond paragraph is here.\n", encoding="utf-8")
    _ingest(workspace, f, unit="paragraph")
    assert [(t, line) for t, _, line, _ in _docs(workspace)] == [
        ("First paragraph, line one,\nand line two.", 1), ("Second paragraph is here.", 5)]


def test_cleaning_and_length_filters(workspace, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("ﬁne   ｆｕｌｌｗｉｄｔｈ\ttext\x07 here\nshort\n" + "y" * 300 + "\n", encoding="utf-8")
    _ingest(workspace, f, min_chars=10, max_chars=200)
    assert [t for t, *_ in _docs(workspace)] == ["fine fullwidth text here"]
    assert _drops(workspace) == {"too_short": 1, "too_long": 1}


def test_exact_dedup_within_and_across_sources(workspace, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(f"{LINES[0]}\n{LINES[0]}\n{LINES[1]}\n", encoding="utf-8")
    b.write_text(f"{LINES[1]}  \n{LINES[2]}\n", encoding="utf-8")  # trailing spaces normalise away
    report = _ingest(workspace, a, b)
    assert [t for t, *_ in _docs(workspace)] == LINES[:3]
    assert [s.dropped for s in report.sources] == [{"exact_duplicate": 1}, {"exact_duplicate": 1}]


def test_near_dedup_drops_a_one_word_edit(workspace, tmp_path):
    base = ("Returns a new deque object initialized left-to-right with data from iterable. If iterable is not "
            "specified, the new deque is empty. Deques are a generalization of stacks and queues.")
    f = tmp_path / "n.txt"
    f.write_text(f"{base}\n{base.replace('generalization', 'generalisation')}\n{LINES[0]}\n", encoding="utf-8")
    report = _ingest(workspace, f, near_dedup=True)
    assert report.sources[0].dropped == {"near_duplicate": 1}
    assert [t for t, *_ in _docs(workspace)] == [base, LINES[0]]
    # against documents ingested earlier, too
    g = tmp_path / "later.txt"
    g.write_text(base.replace("stacks", "stack") + "\n", encoding="utf-8")
    assert _ingest(workspace, g, near_dedup=True).sources[0].dropped == {"near_duplicate": 1}


def test_near_dedup_turned_on_later_checks_earlier_documents(workspace, tmp_path):
    base = "A sufficiently long sentence about ingestion, dedup and the warehouse, repeated with a small change."
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(base + "\n", encoding="utf-8")
    b.write_text(base.replace("small", "tiny") + "\n", encoding="utf-8")
    _ingest(workspace, a)  # no signatures stored yet
    assert _ingest(workspace, b, near_dedup=True).sources[0].dropped == {"near_duplicate": 1}


def test_splits_follow_the_content_hash_and_survive_new_documents(workspace, tmp_path):
    lines = [f"document number {i} with some words in it" for i in range(400)]
    first = tmp_path / "first.txt"
    first.write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    cfg = {"val_fraction": 0.1, "test_fraction": 0.1}
    _ingest(workspace, first, **cfg)
    before = {t: s for t, s, *_ in _docs(workspace)}
    second = tmp_path / "second.txt"
    second.write_text("\n".join(lines[150:]) + "\n", encoding="utf-8")
    _ingest(workspace, second, **cfg)
    after = {t: s for t, s, *_ in _docs(workspace)}
    assert all(after[t] == s for t, s in before.items())
    assert len(after) == 400
    assert all(s == split_of(text_hash(normalize(t)), IngestConfig(**cfg)) for t, s in after.items())
    counts = {s: sum(v == s for v in after.values()) for s in ("train", "val", "test")}
    assert 20 <= counts["val"] <= 65 and 20 <= counts["test"] <= 65  # ~40 each out of 400


def test_ingesting_again_adds_nothing_and_says_so(workspace, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    first = _ingest(workspace, f)
    again = _ingest(workspace, f)
    assert first.added == 4 and again.added == 0
    assert again.sources[0].status == "skipped"
    assert again.fingerprint == first.fingerprint
    copy = tmp_path / "copy.txt"  # same bytes under another name: same sha256, skipped too
    copy.write_bytes(f.read_bytes())
    assert _ingest(workspace, copy).sources[0].status == "skipped"


def test_chinese_text_is_ingested_intact(workspace, tmp_path):
    f = tmp_path / "zh.txt"
    f.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n", encoding="utf-8")
    _ingest(workspace, f)
    # NFKC maps the full-width comma to ASCII; every ideograph and the ideographic full stop stay
    assert _docs(workspace)[0][0] == "床前明月光,疑是地上霜。举头望明月,低头思故乡。"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", b"good first line of text\nbad \xff byte here\n", r"bad\.txt:2: .*UTF-8"),
        ("bad.jsonl", b'{"text": "a fine first record"}\n{"text": oops}\n', r"bad\.jsonl:2: "),
        ("nofield.jsonl", b'{"text": "a fine first record"}\n{"body": "x"}\n', r"nofield\.jsonl:2: .*text"),
        ("empty.txt", b"", r"empty\.txt: .*empty"),
    ],
)
def test_bad_input_is_an_error_naming_file_and_line_and_writes_nothing(workspace, tmp_path, name, content, message):
    good = tmp_path / "good.txt"
    good.write_text(LINES[0] + "\n", encoding="utf-8")
    _ingest(workspace, good)
    before = (_docs(workspace), _drops(workspace))
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(IngestError, match=message):
        _ingest(workspace, bad)
    assert (_docs(workspace), _drops(workspace)) == before
    with warehouse.connect(workspace, read_only=True) as con:
        assert con.sql("SELECT count(*) FROM sources").fetchall()[0][0] == 1


def test_missing_paths_and_empty_directories_fail_before_anything_is_read(workspace, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(LINES[0] + "\n", encoding="utf-8")
    with pytest.raises(IngestError, match="missing.txt: no such file"):
        _ingest(workspace, good, tmp_path / "missing.txt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00\x01")
    with pytest.raises(IngestError, match="empty_dir"):
        _ingest(workspace, empty)
    with warehouse.connect(workspace) as con:
        assert con.sql("SELECT count(*) FROM documents").fetchall()[0][0] == 0


def test_builtin_corpus_keeps_objects_and_their_docstrings(workspace):
    report = ingest(workspace, IngestConfig(builtin_modules=("json", "textwrap")), progress=False)
    assert report.added > 5
    with warehouse.connect(workspace, read_only=True) as con:
        rows = dict(con.sql("SELECT qualname, kind FROM stdlib_objects").fetchall())
        joined = con.sql(
            "SELECT d.object, d.split FROM documents d JOIN stdlib_objects o ON d.hash = o.doc_hash "
            "WHERE o.qualname = 'json.dumps'"
        ).fetchall()
    assert rows["json.dumps"] == "function" and rows["textwrap.TextWrapper"] == "class"
    assert joined and joined[0][0] == "json.dumps"
    again = ingest(workspace, IngestConfig(builtin_modules=("json", "textwrap")), progress=False)
    assert again.added == 0 and again.sources[0].status == "skipped"


def test_parallel_cleaning_matches_serial(tmp_path, monkeypatch):
    from lmpipe import corpus
    from lmpipe.sources import resolve_sources

    monkeypatch.setattr(corpus, "CHUNK_DOCS", 50)  # many small jobs, so order and in-source dedup are exercised
    monkeypatch.setattr(corpus, "PARALLEL_MIN_DOCS", 0)
    lines = [f"line {i % 170} of a parallel test, ｆｕｌｌ width and\ttabs" for i in range(600)] + ["tiny"]
    path = tmp_path / "many.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = resolve_sources([str(path)])[0]
    serial = corpus.read_source(src, IngestConfig(), workers=1)
    jobs = []
    real_pool = corpus._cleaning_pool
    monkeypatch.setattr(corpus, "_cleaning_pool", lambda n: jobs.append(n) or real_pool(n))
    parallel = corpus.read_source(src, IngestConfig(), workers=2)
    assert jobs == [2], "the parallel path was not taken"
    assert parallel.table.equals(serial.table)
    assert parallel.dropped == serial.dropped == {"exact_duplicate": 430, "too_short": 1}
    assert serial.table.num_rows == 170 and serial.read == 601


def test_streamed_ingestion_matches_and_a_late_bad_line_rolls_back_every_chunk(workspace, tmp_path, monkeypatch):
    from lmpipe import corpus, sources

    monkeypatch.setattr(sources, "_BLOCK_BYTES", 256)  # many small chunks,
    monkeypatch.setattr(corpus, "INSERT_ROWS", 10)  # written in many INSERTs by the writer thread
    monkeypatch.setattr(corpus, "PARALLEL_MIN_DOCS", 0)
    lines = [f"streamed line number {i % 90} with enough text to keep" for i in range(300)]
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = _ingest(workspace, good)
    assert report.sources[0].kept == 90 and report.sources[0].dropped == {"exact_duplicate": 210}
    assert [t for t, *_ in _docs(workspace)] == lines[:90]
    with warehouse.connect(workspace, read_only=True) as con:
        ids = [i for (i,) in con.sql("SELECT doc_id FROM documents ORDER BY doc_id").fetchall()]
    assert ids == list(range(1, 91))

    bad = tmp_path / "late_bad.txt"
    bad.write_bytes(("\n".join(f"fresh line {i} that is new to the warehouse" for i in range(200)) + "\n").encode()
                    + b"broken \xff line\n")
    before = (_docs(workspace), _drops(workspace))
    with pytest.raises(IngestError, match=r"late_bad\.txt:201: invalid UTF-8"):
        _ingest(workspace, bad)
    assert (_docs(workspace), _drops(workspace)) == before
    with warehouse.connect(workspace, read_only=True) as con:
        assert con.sql("SELECT count(*) FROM sources").fetchall()[0][0] == 1


def test_streamed_source_of_blank_lines_is_an_error_and_writes_nothing(workspace, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"blank\.txt: empty file: no documents"):
        _ingest(workspace, blank)
    with warehouse.connect(workspace, read_only=True) as con:
        assert con.sql("SELECT count(*) FROM sources").fetchall()[0][0] == 0
        assert con.sql("SELECT count(*) FROM documents").fetchall()[0][0] == 0
