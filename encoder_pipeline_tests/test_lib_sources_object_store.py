"""Corpora on object storage: a real S3-compatible server (moto) on 127.0.0.1, read through Daft."""

import io
import json

import pandas as pd
import pytest

from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
from encoder_pipeline.lib.sources import CorpusError, read_corpus

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "corpora"
DOCS = [{"_id": f"d{i}", "title": f"Section {i}", "text": f"Paragraph {i} says how data number {i} is kept."}
        for i in range(6)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


def test_jsonl_and_parquet_read_from_s3_with_field_mapping(s3):
    rows = [{"key": d["_id"], "heading": d["title"], "body": d["text"]} for d in DOCS]
    s3.put_object(Bucket=BUCKET, Key="mapped/part-0.jsonl",
                  Body="\n".join(json.dumps(r) for r in rows[:3]))
    s3.put_object(Bucket=BUCKET, Key="mapped/part-1.jsonl",
                  Body="\n".join(json.dumps(r) for r in rows[3:]))
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    s3.put_object(Bucket=BUCKET, Key="mapped/all.parquet", Body=buffer.getvalue())

    from_jsonl = read_corpus("jsonl", f"s3://{BUCKET}/mapped/*.jsonl", "key", "heading", "body")
    from_parquet = read_corpus("parquet", f"s3://{BUCKET}/mapped/all.parquet", "key", "heading", "body")
    for frame in (from_jsonl, from_parquet):
        got = frame.to_pandas().sort_values("doc_id").reset_index(drop=True)
        assert list(got["doc_id"]) == [d["_id"] for d in DOCS]
        assert list(got["text"]) == [d["text"] for d in DOCS]
        assert list(got["title"]) == [d["title"] for d in DOCS]


def test_beir_folder_and_markdown_files_clean_from_s3(s3):
    s3.put_object(Bucket=BUCKET, Key="beir/corpus.jsonl", Body="\n".join(json.dumps(d) for d in DOCS))
    units, report = clean_corpus(read_corpus("beir", f"s3://{BUCKET}/beir"), CleaningConfig(min_words=3))
    assert report.counts["read"] == len(DOCS) and len(units) == len(DOCS)

    s3.put_object(Bucket=BUCKET, Key="site/guide/intro.md",
                  Body="# Getting started\n\nInstall it.\n\n## Configure\n\nSet the data root.")
    s3.put_object(Bucket=BUCKET, Key="site/notes.txt", Body="Plain notes about retention periods.")
    s3.put_object(Bucket=BUCKET, Key="site/logo.png", Body=b"\x89PNG not text")
    files = read_corpus("files", f"s3://{BUCKET}/site/").to_pandas().set_index("doc_id")
    assert sorted(files.index) == ["guide/intro.md", "notes.txt"]
    assert files.loc["guide/intro.md", "title"] == "Getting started"
    assert "Configure" in files.loc["guide/intro.md", "text"]


def test_missing_object_names_the_uri(s3):
    with pytest.raises(CorpusError, match=f"s3://{BUCKET}/nowhere/corpus.jsonl"):
        read_corpus("jsonl", f"s3://{BUCKET}/nowhere/corpus.jsonl")
