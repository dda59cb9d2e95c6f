"""The warehouse ingesting Parquet from S3: a local S3-compatible server (moto), read through fsspec (s3fs)
registered on DuckDB, as `lmpipe ingest s3://bucket/*.parquet --set ingest.fsspec_schemes=[s3]` does."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from lmpipe import instructions, sources, warehouse
from lmpipe.cli import main
from lmpipe.config import ConfigError, IngestConfig
from lmpipe.corpus import ingest
from lmpipe.sources import IngestError, resolve_sources

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the local S3 server")
s3fs = pytest.importorskip("s3fs", reason="s3fs (the dev extra) reads s3:// through fsspec")

S3 = IngestConfig(sources=("s3://corpus/*.parquet",), fsspec_schemes=("s3",), min_chars=5)
PART0 = ["The first document in the bucket.", "A second document, also in part zero.", "Shared text across parts."]
PART1 = ["Part one brings a new document.", "Shared text across parts."]  # one duplicate of part zero


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint, monkeypatch):
    """A fresh bucket `corpus` on the local server; credentials and endpoint as a user would export them."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    fs = s3fs.S3FileSystem()
    if fs.exists("corpus"):
        fs.rm("corpus", recursive=True)
    fs.mkdir("corpus")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def put_parquet(fs, key: str, columns: dict[str, list]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    fs.pipe(key, buf.getvalue())


def texts(ws) -> list[str]:
    with warehouse.connect(ws, read_only=True) as con:
        return sorted(r[0] for r in con.execute("SELECT text FROM documents").fetchall())


def test_parquet_glob_on_s3_is_ingested_once(s3, workspace):
    put_parquet(s3, "corpus/part-0.parquet", {"text": PART0, "id": [1, 2, 3]})
    put_parquet(s3, "corpus/part-1.parquet", {"text": PART1, "id": [4, 5]})
    first = ingest(workspace, S3, progress=False)
    assert [(s.uri, s.status, s.read, s.kept) for s in first.sources] == [("s3://corpus/*.parquet", "ingested", 5, 4)]
    assert texts(workspace) == sorted(set(PART0 + PART1))
    with warehouse.connect(workspace, read_only=True) as con:
        assert con.execute("SELECT uri, format FROM sources").fetchall() == [("s3://corpus/*.parquet", "parquet")]
        assert con.execute("SELECT reason, count FROM drops WHERE count > 0").fetchall() == [("exact_duplicate", 1)]

    again = ingest(workspace, S3, progress=False)  # same objects, same listing: nothing to do
    assert [s.status for s in again.sources] == ["skipped"] and len(texts(workspace)) == 4

    # a new object in the bucket changes the listing: the glob is read again, and only new text is added
    put_parquet(s3, "corpus/part-2.parquet", {"text": ["A later upload to the bucket.", PART0[0]]})
    later = ingest(workspace, S3, progress=False)
    assert [(s.status, s.kept) for s in later.sources] == [("ingested", 1)]
    assert texts(workspace) == sorted({*PART0, *PART1, "A later upload to the bucket."})


def test_the_ingest_command_reads_s3_through_fsspec(s3, workspace):
    put_parquet(s3, "corpus/docs.parquet", {"body": PART1})
    args = ["ingest", "s3://corpus/docs.parquet", "--workspace", str(workspace.root), "--no-track",
            "--set", "ingest.fsspec_schemes=[s3]", "--set", "ingest.text_field=body"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 read, 2 kept" in result.output and texts(workspace) == sorted(PART1)


def test_instruction_parquet_on_s3(s3, workspace):
    put_parquet(s3, "corpus/sft.parquet", {"prompt": ["What does `json.dumps` do?"],
                                           "response": ["It serialises an object to a JSON string."]})
    instructions.ingest_files(workspace, ["s3://corpus/sft.parquet"], S3)
    assert sum(instructions.counts(workspace, builtin=False).values()) == 1


def test_missing_objects_and_columns_are_clear_errors(s3, workspace):
    with pytest.raises(IngestError, match=r"s3://nobucket/x\.parquet: no such file or object"):
        ingest(workspace, IngestConfig(sources=("s3://nobucket/x.parquet",), fsspec_schemes=("s3",)), progress=False)
    put_parquet(s3, "corpus/other.parquet", {"content": PART1})
    with pytest.raises(IngestError, match=r"missing column 'text'; columns: 'content'"):
        ingest(workspace, IngestConfig(sources=("s3://corpus/other.parquet",), fsspec_schemes=("s3",)),
               progress=False)
    assert texts(workspace) == []


def test_fsspec_schemes_mark_sources_and_are_validated():
    (via_fsspec,) = resolve_sources(["s3://b/a.parquet"], fsspec_schemes=["s3"])
    (via_duckdb,) = resolve_sources(["s3://b/a.parquet"])
    assert via_fsspec.fsspec and via_fsspec.remote and not via_duckdb.fsspec
    (memory,) = resolve_sources(["memory://b/a.jsonl"], fsspec_schemes=["memory"])  # any scheme fsspec knows
    assert (memory.remote, memory.format) == (True, "jsonl")
    with pytest.raises(ConfigError, match="fsspec_schemes"):
        IngestConfig(fsspec_schemes=("s3://",))
    (unknown,) = resolve_sources(["nosuch://b/a.parquet"], fsspec_schemes=["nosuch"])
    with pytest.raises(IngestError, match=r"nosuch://b/a\.parquet: cannot read nosuch:// through fsspec"):
        sources.source_digest(unknown)


def test_s3_secret_from_the_aws_environment():
    assert sources.s3_secret_sql({}) is None
    assert sources.s3_secret_sql({"AWS_ACCESS_KEY_ID": "AK"}) is None  # no secret key: DuckDB's own secrets apply
    env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "it's", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_SESSION_TOKEN": "tok", "AWS_ENDPOINT_URL": "http://minio.local:9000/"}
    assert sources.s3_secret_sql(env) == (
        "CREATE OR REPLACE TEMPORARY SECRET lmpipe_s3_env (TYPE s3, KEY_ID 'AK', SECRET 'it''s', SESSION_TOKEN 'tok', "
        "REGION 'eu-west-1', ENDPOINT 'minio.local:9000', URL_STYLE 'path', USE_SSL false)")
    aws = sources.s3_secret_sql({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "S", "AWS_REGION": "us-east-2",
                                 "AWS_DEFAULT_REGION": "ignored"})
    assert aws == ("CREATE OR REPLACE TEMPORARY SECRET lmpipe_s3_env (TYPE s3, KEY_ID 'AK', SECRET 'S', "
                   "REGION 'us-east-2')")
