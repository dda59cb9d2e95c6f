"""Find corpus sources and read their documents.

`resolve_sources` turns user specs (files, directories, globs, remote URIs) into `Source` records,
`read_documents` yields the documents of one source with the line or row number each came from, and
`source_digest` fingerprints a source so that re-ingesting an unchanged file can be detected.

Local text, JSONL and JSON files are decoded in Python (strict UTF-8, precise line numbers); Parquet, CSV
and every remote source are read through a fresh in-memory DuckDB connection.

Remote sources: DuckDB reads http(s)://, s3://, gs:// and hf:// URIs with its httpfs extension, taking S3
credentials from the standard AWS environment variables (see :func:`s3_secret_sql`) or from the DuckDB
secrets the user created (``CREATE PERSISTENT SECRET``). URI schemes listed in ``ingest.fsspec_schemes``
are read through an fsspec filesystem registered on the connection instead (s3fs for s3://, gcsfs for
gs://), configured the way that library is (``AWS_*`` variables, ``~/.aws``, ``FSSPEC_S3_*``): the route
for object stores DuckDB's extension cannot reach, and for machines that cannot download the extension.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

import duckdb
import zstandard

T = TypeVar("T")

FORMATS = ("text", "jsonl", "json", "parquet", "csv")
COMPRESSIONS = (None, "gzip", "zstd")
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "hf://")
UNITS = ("line", "paragraph")

_SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_SUFFIX_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_SUPPORTED = ", ".join(_SUFFIX_FORMATS) + " (optionally followed by .gz or .zst, except .parquet)"

_BLOCK_BYTES = 4 << 20  # large reads amortise the codec and decode calls; lines are split per block
_DIGEST_BLOCK = 1 << 20
_BATCH_ROWS = 10_000
_MAX_KEYS = 20  # keys listed in an error message
_BOM = "\ufeff"
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


class IngestError(ValueError):
    """A source that cannot be read: `path`, the 1-based `line` when the format has lines, and a `reason`.

    `line` is set for line-oriented input (text, local JSONL, JSON syntax errors); records of JSON arrays and
    rows of Parquet/CSV/remote data are named inside `reason` ("record 3: ...", "row 7: ...") instead.
    """

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type[IngestError], tuple[str, int | None, str]]:
        # The default pickling would call __init__ with the formatted message only (worker processes need this).
        return (type(self), (self.path, self.line, self.reason))


@dataclass(frozen=True)
class Source:
    """One input: `uri` is an absolute path for local files, the URI itself for remote ones; `fsspec` says a
    remote one is read through an fsspec filesystem rather than DuckDB's own (httpfs)."""

    uri: str
    format: str
    compression: str | None
    remote: bool
    fsspec: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.format!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {self.compression!r}")


# ---------------------------------------------------------------------------------------------- resolving


def classify(name: str) -> tuple[str, str | None] | None:
    """Return (format, compression) for a file name or URL path by its suffix, or None if unsupported."""
    lower = name.lower()
    compression = None
    for suffix, codec in _SUFFIX_COMPRESSIONS.items():
        if lower.endswith(suffix):
            lower, compression = lower[: -len(suffix)], codec
            break
    fmt = _SUFFIX_FORMATS.get(os.path.splitext(lower)[1])
    # Parquet compresses its pages internally; DuckDB cannot read a gzipped or zstd-wrapped Parquet file.
    if fmt is None or (fmt == "parquet" and compression is not None):
        return None
    return fmt, compression


def resolve_sources(specs: Sequence[str], fsspec_schemes: Sequence[str] = ()) -> list[Source]:
    """Expand files, directories (recursive), globs and remote URIs into sources, deduplicated in order.

    Remote URIs whose scheme is in ``fsspec_schemes`` (e.g. ``["s3"]``) are to be read through fsspec.
    """
    if isinstance(specs, str):
        raise TypeError("specs must be a sequence of strings, not a single string")
    found: dict[str, Source] = {}
    for spec in specs:
        for source in _resolve_one(spec, fsspec_schemes):
            found.setdefault(source.uri, source)
    return list(found.values())


def _resolve_one(spec: str, fsspec_schemes: Sequence[str]) -> list[Source]:
    if spec.startswith(REMOTE_SCHEMES) or urlsplit(spec).scheme in fsspec_schemes:
        return [_remote_source(spec, urlsplit(spec).scheme in fsspec_schemes)]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _directory_sources(path)
    if os.path.exists(path):
        return [_file_source(path)]
    if any(ch in path for ch in "*?["):
        return _glob_sources(path)
    raise IngestError(spec, None, "no such file or directory")


def _remote_source(uri: str, fsspec: bool = False) -> Source:
    classified = classify(urlsplit(uri).path)  # the URL path drops ?query and #fragment
    if classified is None:
        raise IngestError(uri, None, f"unsupported suffix; supported: {_SUPPORTED}")
    return Source(uri, classified[0], classified[1], remote=True, fsspec=fsspec)


def _file_source(path: str) -> Source:
    classified = classify(os.path.basename(path))
    if classified is None:
        raise IngestError(path, None, f"unsupported suffix; supported: {_SUPPORTED}")
    return Source(os.path.abspath(path), classified[0], classified[1], remote=False)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_error(error: OSError) -> None:
    # os.walk skips unreadable directories by default, which would silently drop part of a corpus.
    raise IngestError(error.filename or "?", None, f"cannot list directory: {error.strerror}")


def _supported_files(directory: str) -> list[str]:
    paths = []
    for root, dirs, files in os.walk(directory, onerror=_walk_error):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        paths.extend(os.path.join(root, f) for f in files if not _is_hidden(f) and classify(f) is not None)
    return sorted(paths)


def _directory_sources(directory: str) -> list[Source]:
    paths = _supported_files(directory)
    if not paths:
        reason = f"directory has no supported files; supported: {_SUPPORTED}"
        raise IngestError(os.path.abspath(directory), None, reason)
    return [_file_source(p) for p in paths]


def _glob_sources(pattern: str) -> list[Source]:
    # glob skips hidden names for wildcard components by default; "**" recurses.
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise IngestError(pattern, None, "glob matched nothing")
    paths: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            paths.extend(_supported_files(match))
        elif classify(os.path.basename(match)) is not None:
            paths.append(match)
    if not paths:
        reason = f"glob matched {len(matches)} paths but no supported files; supported: {_SUPPORTED}"
        raise IngestError(pattern, None, reason)
    return [_file_source(p) for p in paths]


# ---------------------------------------------------------------------------------------------- reading


def read_documents(source: Source, unit: str = "line", text_field: str = "text") -> Iterator[tuple[int, str]]:
    """Yield (number, text) for each document of `source`; raise IngestError on bad input.

    The number is the 1-based line for local text and JSONL (the first line of a paragraph), the 1-based
    record index for JSON, and the 1-based row for Parquet, CSV and remote JSON/JSONL. `unit` ("line" or
    "paragraph", paragraphs being separated by blank lines) applies to text sources only; `text_field` names
    the field or column holding the text in the other formats. A source with no documents is an error.
    Remote text is fetched whole with DuckDB's read_blob; the other remote formats stream.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
    if source.remote or source.format in ("parquet", "csv"):
        documents = _duckdb_documents(source, unit, text_field)
    else:
        documents = _local_documents(source, unit, text_field)
    return _require_documents(source, documents)


def reads_line_blocks(source: Source, unit: str) -> bool:
    """Whether ``source`` is read as :func:`line_blocks` (local text, one document per line)."""
    return source.format == "text" and unit == "line" and not source.remote


def read_batches(
    source: Source, unit: str = "line", text_field: str = "text", batch_size: int = 20_000
) -> Iterator[tuple[list[int], list[str]]]:
    """:func:`read_documents` in batches of (numbers, texts): the same documents, with the same errors.

    Local line-per-document text, the common case for large corpora, is split a whole block at a time
    instead of one generator step per line, which is several times faster.
    """
    if reads_line_blocks(source, unit):
        empty = True
        for numbers, texts in _local_line_batches(source):
            empty = empty and not texts
            if texts:
                yield numbers, texts
        if empty:
            raise IngestError(source.uri, None, "empty file: no documents")
        return
    numbers, texts = [], []
    for number, text in read_documents(source, unit, text_field):
        numbers.append(number)
        texts.append(text)
        if len(texts) >= batch_size:
            yield numbers, texts
            numbers, texts = [], []
    if texts:
        yield numbers, texts


@dataclass(frozen=True)
class LineBlock:
    """Whole lines of a local text file as raw bytes: cheap to hand to another process, which decodes and
    splits them (:meth:`lines`) where they are cleaned, so the reading process only finds line ends."""

    uri: str
    first_line: int  # 1-based number of the block's first line
    offset: int  # byte offset of the block in the (decompressed) file
    data: bytes

    def lines(self) -> tuple[list[int], list[str]]:
        """(line numbers, texts) of the non-blank lines; invalid UTF-8 raises IngestError naming the line."""
        first = self.first_line
        lines = _split_lines(_decode(self.data, self.uri, first, self.offset), first == 1)
        if "" not in lines and not any(map(str.isspace, lines)):  # the common case, at C speed
            return list(range(first, first + len(lines))), lines
        keep = [i for i, line in enumerate(lines) if line and not line.isspace()]
        return [first + i for i in keep], [lines[i] for i in keep]


def line_blocks(source: Source) -> Iterator[LineBlock]:
    """The blocks of a local line-per-document text source (plain or compressed), in file order."""
    if _local_size(source.uri) == 0:
        raise IngestError(source.uri, None, "empty file")
    try:
        raw = open(source.uri, "rb")  # noqa: SIM115 - closed by the with statement below
    except OSError as error:
        raise IngestError(source.uri, None, f"cannot open: {error.strerror}") from error
    with raw, _decompressed(raw, source.compression) as stream:
        for first, offset, data in _iter_blocks(stream, source.uri):
            yield LineBlock(source.uri, first, offset, data)


def _local_line_batches(source: Source) -> Iterator[tuple[list[int], list[str]]]:
    for block in line_blocks(source):
        yield block.lines()


def read_records(source: Source, parse: Callable[[dict, int], T], what: str) -> list[T]:
    """Every record of a local JSONL (.gz, .zst) or a Parquet file, turned into ``T`` by ``parse(record, number)``.

    For files whose records have several fields (instructions, preference pairs). ``parse`` raises ValueError
    for a bad record; that becomes an IngestError naming the file and the line (JSONL) or row (Parquet). The
    whole file is read and checked before the caller writes anything.
    """
    if source.format == "jsonl" and not source.remote:
        records = list(_jsonl_records(source, parse))
    elif source.format == "parquet":
        records = list(_parquet_records(source, parse))
    else:
        raise IngestError(source.uri, None, f"{what}s are read from local .jsonl (.gz, .zst) or .parquet files")
    if not records:
        raise IngestError(source.uri, None, f"empty file: no {what} records")
    return records


def _jsonl_records(source: Source, parse: Callable[[dict, int], T]) -> Iterator[T]:
    try:
        raw = open(source.uri, "rb")  # noqa: SIM115 - closed by the with statement below
    except OSError as exc:
        raise IngestError(source.uri, None, f"cannot open: {exc.strerror}") from exc
    with raw, _decompressed(raw, source.compression) as stream:
        for number, data in enumerate(stream, start=1):
            try:
                line = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise IngestError(source.uri, number, "invalid UTF-8") from None
            if not line:
                continue
            try:
                yield parse(json.loads(line), number)
            except json.JSONDecodeError as exc:
                raise IngestError(source.uri, number, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
            except ValueError as exc:
                raise IngestError(source.uri, number, str(exc)) from None


def _parquet_records(source: Source, parse: Callable[[dict, int], T]) -> Iterator[T]:
    try:
        with connection(source) as con:
            rel = con.execute("SELECT * FROM read_parquet(?)", [source.uri])
            names = [d[0] for d in rel.description]
            rows = rel.fetchall()
    except duckdb.Error as exc:
        raise IngestError(source.uri, None, f"cannot read as Parquet: {_duckdb_reason(exc)}") from exc
    for number, row in enumerate(rows, start=1):
        record = {k: v for k, v in zip(names, row, strict=True) if v is not None}
        try:
            yield parse(record, number)
        except ValueError as exc:
            raise IngestError(source.uri, None, f"row {number}: {exc}") from None


def _require_documents(source: Source, documents: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    if not source.remote and _local_size(source.uri) == 0:
        raise IngestError(source.uri, None, "empty file")
    empty = True
    for document in documents:
        empty = False
        yield document
    if empty:
        raise IngestError(source.uri, None, "empty file: no documents")


def _local_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise IngestError(path, None, f"cannot open: {error.strerror}") from error


def _local_documents(source: Source, unit: str, text_field: str) -> Iterator[tuple[int, str]]:
    try:
        raw = open(source.uri, "rb")  # noqa: SIM115 - closed by the with statement below
    except OSError as error:
        raise IngestError(source.uri, None, f"cannot open: {error.strerror}") from error
    # GzipFile does not close a file object it was given, hence both in the with statement.
    with raw, _decompressed(raw, source.compression) as stream:
        yield from _stream_documents(stream, source, unit, text_field)


def _decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        # Files written by parallel or streaming compressors often hold several frames.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return raw


def _stream_documents(stream: BinaryIO, source: Source, unit: str, text_field: str) -> Iterator[tuple[int, str]]:
    path = source.uri
    if source.format == "text":
        lines = _iter_lines(stream, path)
        return _paragraphs(lines) if unit == "paragraph" else _nonblank_lines(lines)
    if source.format == "jsonl":
        return _jsonl_documents(_iter_lines(stream, path), path, text_field)
    if source.format == "json":
        return _json_documents(_read_all(stream, path), path, text_field)
    raise ValueError(f"format {source.format!r} is read through DuckDB")


def _read_block(stream: BinaryIO, path: str, size: int) -> bytes:
    try:
        return stream.read(size)
    except _DECOMPRESS_ERRORS as error:
        raise IngestError(path, None, f"cannot read or decompress: {error}") from error


def _decode(data: bytes, path: str, first_line: int, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        bad = data[error.start : error.start + 1].hex()
        reason = f"invalid UTF-8 (byte 0x{bad} at offset {offset + error.start})"
        raise IngestError(path, line, reason) from None


def _iter_blocks(stream: BinaryIO, path: str) -> Iterator[tuple[int, int, bytes]]:
    """Yield (number of the first line, byte offset, bytes) per block; each block ends at a newline (or the
    end of the file), so no line is cut. "\n" never occurs inside a UTF-8 multi-byte sequence."""
    line, offset, pending = 1, 0, []
    while chunk := _read_block(stream, path, _BLOCK_BYTES):
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            pending.append(chunk)  # a line longer than a block: join once its end arrives
            continue
        block = b"".join([*pending, chunk[:cut]])
        pending = [chunk[cut:]]
        yield line, offset, block
        line, offset = line + block.count(b"\n"), offset + len(block)
    if tail := b"".join(pending):
        yield line, offset, tail


def _iter_lines(stream: BinaryIO, path: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (number of the first line, lines) per block."""
    for line, offset, block in _iter_blocks(stream, path):
        yield line, _split_lines(_decode(block, path, line, offset), line == 1)


def _split_lines(text: str, at_start: bool) -> list[str]:
    if at_start and text.startswith(_BOM):
        text = text[1:]
    text = text.replace("\r\n", "\n")  # a lone "\r" stays inside its line; clean.normalize turns it into "\n"
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the empty string after the final newline is not a line
    return lines


def _nonblank_lines(batches: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, str]]:
    for first, lines in batches:
        for number, line in enumerate(lines, first):
            if line and not line.isspace():
                yield number, line


def _paragraphs(batches: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, str]]:
    start, current = 0, []
    for first, lines in batches:
        for number, line in enumerate(lines, first):
            if line and not line.isspace():
                if not current:
                    start = number
                current.append(line)
            elif current:
                yield start, "\n".join(current)
                current = []
    if current:
        yield start, "\n".join(current)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _keys(record: dict) -> str:
    keys = [repr(k) for k in list(record)[:_MAX_KEYS]]
    more = ", ..." if len(record) > _MAX_KEYS else ""
    return f"keys: {', '.join(keys)}{more}" if keys else "no keys"


def _field_problem(record: object, field: str) -> str | None:
    """Return why `record[field]` is not usable text, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    if field not in record:
        return f"missing field {field!r} ({_keys(record)})"
    if not isinstance(record[field], str):
        return f"field {field!r} is {_json_type(record[field])}, not a string ({_keys(record)})"
    return None


_raw_decode = json.JSONDecoder().raw_decode


def _load_json_line(line: str, path: str, number: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise IngestError(path, number, f"malformed JSON: {error.msg} (column {error.colno})") from None


def _jsonl_documents(batches: Iterator[tuple[int, list[str]]], path: str, field: str) -> Iterator[tuple[int, str]]:
    for first, lines in batches:
        for number, line in enumerate(lines, first):
            if not line or line.isspace():
                continue
            # raw_decode skips the two whitespace regex matches json.loads makes around every document (a
            # third of the parse time for short records); anything unusual gets json.loads's exact verdict.
            try:
                record, end = _raw_decode(line)
            except json.JSONDecodeError:
                record, end = None, -1
            if end != len(line):
                record = _load_json_line(line, path, number)
            text = record.get(field) if type(record) is dict else None
            if type(text) is not str:
                raise IngestError(path, number, _field_problem(record, field) or "not a string")
            yield number, text


def _read_all(stream: BinaryIO, path: str) -> str:
    text = _decode(_read_block(stream, path, -1), path, 1, 0)
    return text[1:] if text.startswith(_BOM) else text


def _json_records(document: object, path: str) -> list:
    """The records of a JSON file: a top-level array, or the one list-valued member of a top-level object."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
        shape = f"an object with {len(lists)} list-valued keys ({_keys(document)})"
    else:
        shape = _json_type(document)
    raise IngestError(path, None, f"expected an array of objects or an object with one list-valued key, got {shape}")


def _json_documents(text: str, path: str, field: str) -> Iterator[tuple[int, str]]:
    if not text.strip():
        raise IngestError(path, None, "empty file")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise IngestError(path, error.lineno, f"malformed JSON: {error.msg} (column {error.colno})") from None
    for number, record in enumerate(_json_records(document, path), 1):
        problem = _field_problem(record, field)
        if problem is not None:
            raise IngestError(path, None, f"record {number}: {problem}")
        yield number, record[field]


# ---------------------------------------------------------------------------------------------- DuckDB


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _table_function(fmt: str, compression: str | None, json_layout: str = "array") -> str:
    """The DuckDB table function reading `fmt`; the location is bound as the `?` parameter."""
    codec = compression or "none"  # explicit, because remote URLs with a ?query defeat suffix detection
    if fmt == "parquet":
        return "read_parquet(?)"
    if fmt == "csv":
        # all_varchar keeps numeric-looking text as written instead of letting type sniffing reject or reformat it
        return f"read_csv(?, header = true, all_varchar = true, compression = '{codec}')"
    if fmt == "jsonl":
        return f"read_json(?, format = 'newline_delimited', records = true, compression = '{codec}')"
    if fmt == "json":
        return f"read_json(?, format = '{json_layout}', records = true, compression = '{codec}')"
    raise ValueError(f"no DuckDB table function for format {fmt!r}")


# ---------------------------------------------------------------------------------------------- remote access


@contextlib.contextmanager
def connection(source: Source) -> Iterator[duckdb.DuckDBPyConnection]:
    """A fresh in-memory DuckDB connection that can read ``source``, closed on exit.

    A remote source gets its fsspec filesystem registered (``source.fsspec``), or for s3:// the S3
    credentials of the environment as a temporary secret (DuckDB otherwise uses the user's own secrets).
    """
    con = duckdb.connect(":memory:")
    try:
        scheme = urlsplit(source.uri).scheme
        if source.remote and source.fsspec:
            con.register_filesystem(fsspec_filesystem(scheme, source.uri))
        elif source.remote and scheme == "s3" and (secret := s3_secret_sql(os.environ)):
            con.execute(secret)
        yield con
    finally:
        con.close()


def fsspec_filesystem(scheme: str, uri: str = "") -> object:
    """The fsspec filesystem of ``scheme`` as fsspec configures it (arguments from ``FSSPEC_<SCHEME>_*``)."""
    try:
        import fsspec

        return fsspec.filesystem(scheme)
    except (ImportError, ValueError) as error:  # no implementation installed (s3fs, gcsfs), or unknown scheme
        raise IngestError(uri or f"{scheme}://", None, f"cannot read {scheme}:// through fsspec: {error}") from error


def s3_secret_sql(env: Mapping[str, str]) -> str | None:
    """A DuckDB ``CREATE SECRET`` statement with the S3 credentials of the standard AWS variables, or None.

    ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (both needed), ``AWS_SESSION_TOKEN``, ``AWS_REGION``
    (or ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) for an S3-compatible
    server (MinIO, Ceph, R2...), which is then addressed with path-style URLs, over TLS if the URL is https.
    """
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        return None
    options = {"KEY_ID": key, "SECRET": secret}
    if token := env.get("AWS_SESSION_TOKEN"):
        options["SESSION_TOKEN"] = token
    if region := env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        options["REGION"] = region
    flags = {}
    if endpoint := env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["ENDPOINT"] = url.netloc + url.path.rstrip("/")
        options["URL_STYLE"] = "path"
        flags["USE_SSL"] = "true" if url.scheme == "https" else "false"
    values = [f"{k} '{v.replace(chr(39), chr(39) * 2)}'" for k, v in options.items()]
    values += [f"{k} {v}" for k, v in flags.items()]
    return f"CREATE OR REPLACE TEMPORARY SECRET lmpipe_s3_env (TYPE s3, {', '.join(values)})"


def _duckdb_reason(error: duckdb.Error) -> str:
    """The useful line of a DuckDB error: its first, or the exception line of a Python filesystem's traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        raised = [line for line in lines if not line.startswith((" ", "Traceback", "LINE "))]
        return raised[0] if raised else lines[-1]
    return lines[0] if lines else type(error).__name__


def _duckdb_documents(source: Source, unit: str, field: str) -> Iterator[tuple[int, str]]:
    """Read any DuckDB-readable source (local path or remote URI) with DuckDB's own readers."""
    location, fmt, compression = source.uri, source.format, source.compression
    try:
        with connection(source) as con:
            if fmt == "text":
                stream = _decompressed(io.BytesIO(_fetch_blob(con, location)), compression)
                yield from _stream_documents(stream, source, unit, field)
            else:
                yield from _column_documents(con, _relation(con, location, fmt, compression), location, field)
    except duckdb.Error as error:
        raise IngestError(location, None, f"cannot read as {fmt}: {_duckdb_reason(error)}") from error


def _fetch_blob(con: duckdb.DuckDBPyConnection, location: str) -> bytes:
    # read_blob rather than read_text: it passes compressed bytes through and lets invalid UTF-8 be reported
    # with its line number by the same decoder as local files.
    # read_blob treats its argument as a glob: no match is no row, several matches several rows.
    rows = con.execute("SELECT content FROM read_blob(?)", [location]).fetchmany(2)
    if not rows:
        raise IngestError(location, None, "no such file or object")
    if len(rows) > 1:
        raise IngestError(location, None, "the pattern matches several text objects; list them separately")
    if not rows[0][0]:
        raise IngestError(location, None, "empty file")
    return bytes(rows[0][0])


def _relation(con: duckdb.DuckDBPyConnection, location: str, fmt: str, compression: str | None) -> str:
    """A FROM-clause source for the records of `location`, with one `?` parameter for the location."""
    function = _table_function(fmt, compression)
    if fmt != "json":
        return function
    try:
        con.execute(f"DESCRIBE SELECT * FROM {function}", [location]).fetchall()
        return function
    except duckdb.InvalidInputException:
        pass  # not a top-level array: try an object wrapping one list of records
    wrapper = _table_function(fmt, compression, json_layout="unstructured")
    types = _column_types(con, wrapper, location)
    lists = [name for name, kind in types.items() if kind.startswith("STRUCT(") and kind.endswith(")[]")]
    if len(lists) != 1:
        keys = ", ".join(repr(k) for k in types)
        reason = f"expected an array of objects or an object with one list of objects, got keys: {keys}"
        raise IngestError(location, None, reason)
    return f"(SELECT record.* FROM (SELECT unnest({_quote(lists[0])}) AS record FROM {wrapper}))"


def _column_types(con: duckdb.DuckDBPyConnection, relation: str, location: str) -> dict[str, str]:
    rows = con.execute(f"DESCRIBE SELECT * FROM {relation}", [location]).fetchall()
    return {row[0]: row[1] for row in rows}


def _column_documents(
    con: duckdb.DuckDBPyConnection, relation: str, location: str, field: str
) -> Iterator[tuple[int, str]]:
    """Stream `field` of `relation` in batches, checking that every value is a non-NULL string."""
    types = _column_types(con, relation, location)
    if field not in types:
        columns = ", ".join(repr(name) for name in types)
        raise IngestError(location, None, f"missing column {field!r}; columns: {columns}")
    kind = types[field]
    if kind == "VARCHAR":
        select = _quote(field)
    elif kind == "JSON":  # read_json's type for a field whose values mix strings and other JSON types
        select = f"{_quote(field)} ->> '$', json_type({_quote(field)})"
    else:
        raise IngestError(location, None, f"column {field!r} has type {kind}, not text")
    cursor = con.execute(f"SELECT {select} FROM {relation}", [location])
    done = 0
    while rows := cursor.fetchmany(_BATCH_ROWS):
        texts = [row[0] for row in rows]
        _check_batch(rows, texts, done, location, field)
        yield from enumerate(texts, done + 1)
        done += len(texts)


def _check_batch(rows: list[tuple], texts: list[str | None], done: int, location: str, field: str) -> None:
    """Reject NULLs, and for JSON-typed columns any value that is not a JSON string; `done` rows came before."""
    if None in texts:
        raise IngestError(location, None, f"row {done + texts.index(None) + 1}: {field!r} is NULL or missing")
    if len(rows[0]) == 1:
        return
    for number, row in enumerate(rows, done + 1):
        if row[1] != "VARCHAR":
            raise IngestError(location, None, f"row {number}: {field!r} is JSON {row[1].lower()}, not a string")


# ---------------------------------------------------------------------------------------------- digest


def source_digest(source: Source) -> tuple[str, int]:
    """Return (sha256 hex, size in bytes) identifying the stored bytes of `source`.

    Local files: the hash of the raw bytes as stored (still compressed), read in 1 MiB blocks. Remote
    sources: no content is downloaded; the hash covers the URI and the name, size and last-modified time of
    each object it matches as DuckDB's read_blob reports them (no ETag is available there), so a remote
    change that keeps both size and timestamp goes unnoticed; the size is the objects' total.
    """
    if source.remote:
        return _remote_digest(source)
    digest, size = hashlib.sha256(), 0
    try:
        with open(source.uri, "rb") as handle:
            while block := handle.read(_DIGEST_BLOCK):
                digest.update(block)
                size += len(block)
    except OSError as error:
        raise IngestError(source.uri, None, f"cannot open: {error.strerror}") from error
    return digest.hexdigest(), size


def _remote_digest(source: Source) -> tuple[str, int]:
    # Selecting only these columns lets read_blob skip the content; a glob URI lists every object it matches.
    uri = source.uri
    query = "SELECT filename, size, last_modified FROM read_blob(?) ORDER BY filename"
    try:
        with connection(source) as con:
            rows = con.execute(query, [uri]).fetchall()
    except duckdb.Error as error:
        raise IngestError(uri, None, f"cannot stat: {_duckdb_reason(error)}") from error
    if not rows:
        raise IngestError(uri, None, "no such file or object")
    digest = hashlib.sha256(uri.encode())
    for name, size, modified in rows:
        digest.update(f"\n{name}\n{size}\n{modified.isoformat() if modified else ''}".encode())
    return digest.hexdigest(), sum(size or 0 for _, size, _ in rows)
