"""Tests for lmpipe.sources: resolving specs and reading every supported format."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmpipe import sources
from lmpipe.sources import IngestError, Source, read_documents, resolve_sources, source_digest

# ------------------------------------------------------------------------------------------------ helpers


def write(path: Path, data: bytes | str, compression: str | None = None) -> Path:
    """Write `data` (str as UTF-8) to `path`, compressed with gzip or zstd when asked."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if compression == "gzip":
        raw = gzip.compress(raw)
    elif compression == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def local(path: Path, fmt: str, compression: str | None = None) -> Source:
    return Source(str(path), fmt, compression, remote=False)


def via_duckdb(path: Path, fmt: str, compression: str | None = None) -> Source:
    """A local file marked remote: read through exactly the DuckDB code used for http/s3/gs/hf URIs."""
    return Source(str(path), fmt, compression, remote=True)


def docs(source: Source, **kwargs: str) -> list[tuple[int, str]]:
    return list(read_documents(source, **kwargs))


def ingest_error(source: Source, **kwargs: str) -> IngestError:
    with pytest.raises(IngestError) as info:
        docs(source, **kwargs)
    return info.value


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


SUFFIX = {None: "", "gzip": ".gz", "zstd": ".zst"}
TEXT = "first line\n\n  \nsecond line\nthird\n"
TEXT_DOCS = [(1, "first line"), (4, "second line"), (5, "third")]
JSONL = '{"text": "alpha", "id": 1}\n\n{"text": "beta"}\n'
JSON_ARRAY = '[{"text": "alpha", "id": 1}, {"text": "beta"}]'
CSV = 'id,text\n1,alpha\n2,"beta, with comma\nand newline"\n3,007\n'
CSV_DOCS = [(1, "alpha"), (2, "beta, with comma\nand newline"), (3, "007")]


# ------------------------------------------------------------------------------------------------ IngestError


def test_ingest_error_message_attributes_and_pickling() -> None:
    error = IngestError("/data/a.jsonl", 7, "malformed JSON")
    assert (error.path, error.line, error.reason) == ("/data/a.jsonl", 7, "malformed JSON")
    assert str(error) == "/data/a.jsonl:7: malformed JSON"
    assert str(IngestError("/data/a.jsonl", None, "empty file")) == "/data/a.jsonl: empty file"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.reason, str(copy)) == (error.path, error.line, error.reason, str(error))


def test_source_rejects_unknown_format_and_compression() -> None:
    with pytest.raises(ValueError, match="format"):
        Source("/x.doc", "doc", None, remote=False)
    with pytest.raises(ValueError, match="compression"):
        Source("/x.txt.bz2", "text", "bzip2", remote=False)


# ------------------------------------------------------------------------------------------------ resolving


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", ("text", None)),
        ("A.MD", ("text", None)),
        ("a.jsonl", ("jsonl", None)),
        ("a.ndjson.gz", ("jsonl", "gzip")),
        ("a.json.zst", ("json", "zstd")),
        ("a.parquet", ("parquet", None)),
        ("a.csv.gz", ("csv", "gzip")),
        ("a.txt.zst", ("text", "zstd")),
        ("a.parquet.gz", None),
        ("a.gz", None),
        ("a.tar.gz", None),
        ("a.docx", None),
        (".txt", None),
    ],
)
def test_classify(name: str, expected: tuple[str, str | None] | None) -> None:
    assert sources.classify(name) == expected


def test_resolve_file_gives_absolute_path_and_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "corpus.jsonl.gz", JSONL, "gzip")
    monkeypatch.chdir(tmp_path)
    assert resolve_sources(["corpus.jsonl.gz"]) == [
        Source(str(tmp_path / "corpus.jsonl.gz"), "jsonl", "gzip", remote=False)
    ]


def test_resolve_directory_is_recursive_sorted_and_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    for name in ["b.txt", "a.md", "sub/c.csv", "sub/deeper/d.json.zst", "notes.docx", ".hidden.txt", ".git/e.txt"]:
        write(tmp_path / name, "x\n")
    uris = [s.uri for s in resolve_sources([str(tmp_path)])]
    expected = ["a.md", "b.txt", "sub/c.csv", "sub/deeper/d.json.zst"]
    assert uris == [str(tmp_path / name) for name in expected]


def test_resolve_globs(tmp_path: Path) -> None:
    for name in ["a1.txt", "a2.txt", "b.txt", "sub/a3.txt", "sub/x.jsonl", "sub/.a4.txt", "readme.rst"]:
        write(tmp_path / name, "x\n")
    names = lambda specs: [os.path.relpath(s.uri, tmp_path) for s in resolve_sources(specs)]  # noqa: E731
    assert names([str(tmp_path / "a?.txt")]) == ["a1.txt", "a2.txt"]
    assert names([str(tmp_path / "[ab]*.txt")]) == ["a1.txt", "a2.txt", "b.txt"]
    assert names([str(tmp_path / "**" / "a*.txt")]) == ["a1.txt", "a2.txt", "sub/a3.txt"]
    assert names([str(tmp_path / "*")]) == ["a1.txt", "a2.txt", "b.txt", "sub/a3.txt", "sub/x.jsonl"]


def test_resolve_removes_duplicates_and_keeps_order(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "x\n")
    write(tmp_path / "b.txt", "x\n")
    specs = [str(tmp_path / "b.txt"), str(tmp_path), str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]
    assert [Path(s.uri).name for s in resolve_sources(specs)] == ["b.txt", "a.txt"]


def test_resolve_remote_uris_pass_through() -> None:
    specs = [
        "https://example.org/data/train.jsonl.gz?download=1",
        "s3://bucket/corpus/*.parquet",
        "gs://bucket/a.csv",
        "hf://datasets/org/name/data.json",
        "http://example.org/book.txt",
    ]
    assert [(s.uri, s.format, s.compression, s.remote) for s in resolve_sources(specs)] == [
        (specs[0], "jsonl", "gzip", True),
        (specs[1], "parquet", None, True),
        (specs[2], "csv", None, True),
        (specs[3], "json", None, True),
        (specs[4], "text", None, True),
    ]


def test_resolve_errors(tmp_path: Path) -> None:
    write(tmp_path / "notes.docx", "x")
    write(tmp_path / "only_docs" / "a.pdf", "x")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing.txt"): "no such file or directory",
        str(tmp_path / "*.jsonl"): "glob matched nothing",
        str(tmp_path / "*.docx"): "no supported files",
        str(tmp_path / "notes.docx"): "unsupported suffix",
        str(tmp_path / "only_docs"): "directory has no supported files",
        str(tmp_path / "empty"): "directory has no supported files",
        "https://example.org/page.html": "unsupported suffix",
    }
    for spec, message in cases.items():
        with pytest.raises(IngestError, match=message) as info:
            resolve_sources([spec])
        assert info.value.path.endswith(os.path.basename(spec))
    with pytest.raises(IngestError) as info:
        resolve_sources([str(tmp_path / "empty")])
    assert ".txt" in info.value.reason and ".parquet" in info.value.reason  # says what would be supported


def test_resolve_rejects_a_single_string() -> None:
    with pytest.raises(TypeError):
        resolve_sources("data/")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_text_lines(tmp_path: Path, suffix: str, compression: str | None) -> None:
    path = write(tmp_path / f"a{suffix}{SUFFIX[compression]}", TEXT, compression)
    (source,) = resolve_sources([str(path)])
    assert (source.format, source.compression) == ("text", compression)
    assert docs(source) == TEXT_DOCS


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_text_paragraphs(tmp_path: Path, compression: str | None) -> None:
    text = "\n\nTitle line\nsecond line\n\n\n \nNext paragraph\r\nstill next\n\nlast"
    path = write(tmp_path / f"a.txt{SUFFIX[compression]}", text, compression)
    assert docs(local(path, "text", compression), unit="paragraph") == [
        (3, "Title line\nsecond line"),
        (8, "Next paragraph\nstill next"),
        (11, "last"),
    ]


def test_text_crlf_bom_and_chinese(tmp_path: Path) -> None:
    path = write(tmp_path / "zh.txt", "\ufeff中文第一行，没有问题。\r\n\r\n第二行：日本語も한국어도\r\n")
    assert docs(local(path, "text")) == [(1, "中文第一行，没有问题。"), (3, "第二行：日本語も한국어도")]


def test_text_lines_across_small_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks force lines, multi-byte characters and paragraphs to straddle block boundaries.
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 5)
    lines = ["短", "", "a much longer line than any block", "汉字汉字汉字", "", "", "x"]
    path = write(tmp_path / "a.txt", "\ufeff" + "\n".join(lines) + "\n")
    assert docs(local(path, "text")) == [(i + 1, line) for i, line in enumerate(lines) if line]
    assert docs(local(path, "text"), unit="paragraph") == [
        (1, "短"),
        (3, "a much longer line than any block\n汉字汉字汉字"),
        (7, "x"),
    ]


def test_text_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "one\ntwo")
    assert docs(local(path, "text")) == [(1, "one"), (2, "two")]


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_invalid_utf8_reports_line(tmp_path: Path, compression: str | None) -> None:
    data = "ok\n\nstill ok é\n".encode() + b"bad \xff here\nafter\n"
    path = write(tmp_path / f"a.txt{SUFFIX[compression]}", data, compression)
    error = ingest_error(local(path, "text", compression))
    assert (error.path, error.line) == (str(path), 4)
    assert "invalid UTF-8" in error.reason and "0xff" in error.reason


def test_invalid_utf8_line_in_a_later_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 8)
    path = write(tmp_path / "a.jsonl", b'{"text": "a"}\n' * 5 + b'{"text": "\xc3("}\n')
    assert ingest_error(local(path, "jsonl")).line == 6


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n", b"\xef\xbb\xbf"])
def test_empty_text_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "a.txt", content)
    error = ingest_error(local(path, "text"))
    assert error.reason.startswith("empty file") and error.line is None


def test_empty_compressed_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt.gz", b"", "gzip")
    assert ingest_error(local(path, "text", "gzip")).reason.startswith("empty file")


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    assert "cannot open" in ingest_error(local(tmp_path / "gone.txt", "text")).reason
    corrupt = write(tmp_path / "a.txt.gz", b"this is not gzip data")
    assert "decompress" in ingest_error(local(corrupt, "text", "gzip")).reason
    truncated = write(tmp_path / "b.txt.gz", gzip.compress(b"line\n" * 1000)[:-20])
    assert "decompress" in ingest_error(local(truncated, "text", "gzip")).reason


def test_zstd_with_several_frames(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    path = write(tmp_path / "a.txt.zst", compressor.compress(b"one\n") + compressor.compress(b"two\n"))
    assert docs(local(path, "text", "zstd")) == [(1, "one"), (2, "two")]


def test_unknown_unit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unit"):
        read_documents(local(write(tmp_path / "a.txt", "x"), "text"), unit="sentence")


# ------------------------------------------------------------------------------------------------ JSONL / JSON


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_jsonl(tmp_path: Path, compression: str | None) -> None:
    path = write(tmp_path / f"a.jsonl{SUFFIX[compression]}", "\ufeff" + JSONL.replace("\n", "\r\n"), compression)
    assert docs(local(path, "jsonl", compression)) == [(1, "alpha"), (3, "beta")]


def test_jsonl_custom_field_and_chinese(tmp_path: Path) -> None:
    lines = [json.dumps({"content": "中文内容"}, ensure_ascii=False), json.dumps({"content": "转义\u00e9"})]
    path = write(tmp_path / "a.ndjson", "\n".join(lines))
    assert docs(local(path, "jsonl"), text_field="content") == [(1, "中文内容"), (2, "转义é")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated}', "malformed JSON"),
        ('["text"]', "expected a JSON object, got array"),
        ('{"body": "x", "id": 3}', "missing field 'text' (keys: 'body', 'id')"),
        ('{"text": 42, "id": 3}', "field 'text' is number, not a string (keys: 'text', 'id')"),
        ('{"text": null}', "field 'text' is null, not a string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "fine"}\n\n' + bad_line + "\n")
    error = ingest_error(local(path, "jsonl"))
    assert (error.path, error.line) == (str(path), 3)
    assert message in error.reason


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    assert ingest_error(local(write(tmp_path / "a.jsonl", content), "jsonl")).reason.startswith("empty file")


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_json_array(tmp_path: Path, compression: str | None) -> None:
    path = write(tmp_path / f"a.json{SUFFIX[compression]}", JSON_ARRAY, compression)
    assert docs(local(path, "json", compression)) == [(1, "alpha"), (2, "beta")]


def test_json_object_with_one_list(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", '\ufeff{"version": 2, "rows": [{"body": "x"}, {"body": "中文"}]}')
    assert docs(local(path, "json"), text_field="body") == [(1, "x"), (2, "中文")]


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]', 3, "malformed JSON"),
        ('[{"text": "a"}, {"txt": "b"}]', None, "record 2: missing field 'text' (keys: 'txt')"),
        ('[{"text": "a"}, "b"]', None, "record 2: expected a JSON object, got string"),
        ('[{"text": ["a"]}]', None, "record 1: field 'text' is array, not a string"),
        ('{"a": [], "b": []}', None, "object with 2 list-valued keys"),
        ('{"text": "a"}', None, "object with 0 list-valued keys"),
        ('"just a string"', None, "got string"),
        ("  \n", None, "empty file"),
        ("[]", None, "empty file"),
    ],
)
def test_json_errors(tmp_path: Path, content: str, line: int | None, message: str) -> None:
    path = write(tmp_path / "a.json", content)
    error = ingest_error(local(path, "json"))
    assert error.line == line
    assert message in error.reason


# ------------------------------------------------------------------------------------------------ Parquet / CSV


def test_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"id": [1, 2, 3], "text": ["alpha", "中文", ""]})
    (source,) = resolve_sources([str(path)])
    assert docs(source) == [(1, "alpha"), (2, "中文"), (3, "")]


def test_parquet_streams_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_BATCH_ROWS", 3)
    texts = [f"doc {i}" for i in range(10)]
    path = write_parquet(tmp_path / "a.parquet", {"text": texts})
    assert docs(local(path, "parquet")) == list(enumerate(texts, 1))


def test_parquet_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_column = write_parquet(tmp_path / "a.parquet", {"id": [1], "body": ["x"]})
    error = ingest_error(local(no_column, "parquet"))
    assert (error.path, error.line) == (str(no_column), None)
    assert error.reason == "missing column 'text'; columns: 'id', 'body'"
    monkeypatch.setattr(sources, "_BATCH_ROWS", 2)
    with_null = write_parquet(tmp_path / "b.parquet", {"text": ["a", "b", "c", None]})
    assert "row 4: 'text' is NULL" in ingest_error(local(with_null, "parquet")).reason
    numbers = write_parquet(tmp_path / "c.parquet", {"text": [1, 2]})
    assert "has type BIGINT, not text" in ingest_error(local(numbers, "parquet")).reason
    empty = write_parquet(tmp_path / "d.parquet", {"text": pa.array([], pa.string())})
    assert ingest_error(local(empty, "parquet")).reason.startswith("empty file")
    not_parquet = write(tmp_path / "e.parquet", "plain text")
    assert "cannot read as parquet" in ingest_error(local(not_parquet, "parquet")).reason


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_csv(tmp_path: Path, compression: str | None) -> None:
    path = write(tmp_path / f"a.csv{SUFFIX[compression]}", CSV, compression)
    assert docs(local(path, "csv", compression)) == CSV_DOCS


def test_csv_errors(tmp_path: Path) -> None:
    no_column = write(tmp_path / "a.csv", "id,body\n1,x\n")
    assert "missing column 'text'; columns: 'id', 'body'" in ingest_error(local(no_column, "csv")).reason
    with_null = write(tmp_path / "b.csv", "id,text\n1,a\n2,\n")
    assert "row 2: 'text' is NULL" in ingest_error(local(with_null, "csv")).reason
    header_only = write(tmp_path / "c.csv", "id,text\n")
    assert ingest_error(local(header_only, "csv")).reason.startswith("empty file")
    assert ingest_error(local(write(tmp_path / "d.csv", ""), "csv")).reason.startswith("empty file")


# ------------------------------------------------------------------------------------------------ remote path


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_remote_path_text(tmp_path: Path, compression: str | None) -> None:
    path = write(tmp_path / f"a.txt{SUFFIX[compression]}", "\ufeff" + TEXT, compression)
    assert docs(via_duckdb(path, "text", compression)) == TEXT_DOCS
    paragraphs = [(1, "first line"), (4, "second line\nthird")]
    assert docs(via_duckdb(path, "text", compression), unit="paragraph") == paragraphs


def test_remote_path_text_errors(tmp_path: Path) -> None:
    bad = write(tmp_path / "a.txt", b"ok\n\xfe\n")
    assert ingest_error(via_duckdb(bad, "text")).line == 2
    empty = write(tmp_path / "b.txt", b"")
    assert ingest_error(via_duckdb(empty, "text")).reason.startswith("empty file")
    assert ingest_error(via_duckdb(tmp_path / "gone.txt", "text")).reason == "no such file or object"


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_remote_path_jsonl_and_json(tmp_path: Path, compression: str | None) -> None:
    jsonl = write(tmp_path / f"a.jsonl{SUFFIX[compression]}", JSONL, compression)
    assert docs(via_duckdb(jsonl, "jsonl", compression)) == [(1, "alpha"), (2, "beta")]
    array = write(tmp_path / f"a.json{SUFFIX[compression]}", JSON_ARRAY, compression)
    assert docs(via_duckdb(array, "json", compression)) == [(1, "alpha"), (2, "beta")]


def test_remote_path_json_object_with_one_list(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", '{"version": 2, "rows": [{"body": "x", "n": 1}, {"body": "中文", "n": 2}]}')
    assert docs(via_duckdb(path, "json"), text_field="body") == [(1, "x"), (2, "中文")]
    two_lists = write(tmp_path / "b.json", '{"a": [{"text": "x"}], "b": [{"text": "y"}]}')
    assert "one list of objects" in ingest_error(via_duckdb(two_lists, "json")).reason


def test_remote_path_field_errors(tmp_path: Path) -> None:
    missing = write(tmp_path / "a.jsonl", '{"body": "x"}\n')
    assert "missing column 'text'; columns: 'body'" in ingest_error(via_duckdb(missing, "jsonl")).reason
    partly = write(tmp_path / "b.jsonl", '{"text": "x"}\n{"body": "y"}\n')
    assert "row 2: 'text' is NULL or missing" in ingest_error(via_duckdb(partly, "jsonl")).reason
    mixed = write(tmp_path / "c.jsonl", '{"text": "x"}\n{"text": 5}\n')
    assert "row 2: 'text' is JSON ubigint, not a string" in ingest_error(via_duckdb(mixed, "jsonl")).reason
    not_objects = write(tmp_path / "d.jsonl", '{"text": "x"}\n[1]\n')
    assert "cannot read as jsonl" in ingest_error(via_duckdb(not_objects, "jsonl")).reason


def test_remote_path_parquet_and_csv(tmp_path: Path) -> None:
    parquet = write_parquet(tmp_path / "a.parquet", {"text": ["a", "b"]})
    assert docs(via_duckdb(parquet, "parquet")) == [(1, "a"), (2, "b")]
    csv = write(tmp_path / "a.csv.gz", CSV, "gzip")
    assert docs(via_duckdb(csv, "csv", "gzip")) == CSV_DOCS


# ------------------------------------------------------------------------------------------------ digest


def test_local_digest_covers_stored_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_DIGEST_BLOCK", 7)  # several blocks
    path = write(tmp_path / "a.txt.gz", TEXT * 10, "gzip")
    stored = path.read_bytes()
    assert source_digest(local(path, "text", "gzip")) == (hashlib.sha256(stored).hexdigest(), len(stored))
    with pytest.raises(IngestError, match="cannot open"):
        source_digest(local(tmp_path / "gone.txt", "text"))


def test_remote_digest_uses_uri_size_and_modification_time(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", TEXT)
    digest, size = source_digest(via_duckdb(path, "text"))
    assert size == len(TEXT) and len(digest) == 64
    assert digest != hashlib.sha256(TEXT.encode()).hexdigest()
    assert source_digest(via_duckdb(path, "text")) == (digest, size)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert source_digest(via_duckdb(path, "text"))[0] != digest
    with pytest.raises(IngestError, match="no such file"):
        source_digest(via_duckdb(tmp_path / "gone.txt", "text"))


def test_remote_digest_of_a_pattern_covers_every_match(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "one\n")
    write(tmp_path / "b.txt", "three\n")
    pattern = tmp_path / "*.txt"
    digest, size = source_digest(via_duckdb(pattern, "text"))
    assert size == 10
    write(tmp_path / "b.txt", "four\n")
    assert source_digest(via_duckdb(pattern, "text"))[0] != digest
    assert "several text objects" in ingest_error(via_duckdb(pattern, "text")).reason


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz", "para.txt"])
def test_read_batches_yields_the_same_documents_as_read_documents(tmp_path, name):
    from lmpipe.sources import read_batches

    text = "first line\n\n  \nsecond line\r\nthird\n\nfourth para line\nstill fourth\n" * 50
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    source = resolve_sources([str(path)])[0]
    unit = "paragraph" if name.startswith("para") else "line"
    batches = list(read_batches(source, unit=unit, batch_size=7))
    flat = [(n, t) for numbers, texts in batches for n, t in zip(numbers, texts, strict=True)]
    assert flat == list(read_documents(source, unit=unit))


def test_read_batches_reports_bad_utf8_and_empty_files_like_read_documents(tmp_path):
    from lmpipe.sources import read_batches

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\nanother ok line\nbad \xfe here\n")
    with pytest.raises(IngestError, match=r"bad\.txt:3: invalid UTF-8"):
        list(read_batches(resolve_sources([str(bad)])[0]))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(IngestError, match="empty file: no documents"):
        list(read_batches(resolve_sources([str(blank)])[0]))
