"""Bad input, as a user meets it: each case fails with a message naming the file, line or field, or
is skipped and counted where the spec says so. Corpora are real (the web_qa sample, ../shared),
damaged on purpose; LLM endpoints are a real local HTTP server (test_lib_llm.FakeOpenAIServer)."""

import functools
import json
import re

import dagster as dg
import pytest
from fake_llm import FAKE_KEY, FakeOpenAIServer, serving
from spec_files import write_spec

from encoder_pipeline import cli
from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import SpecError, domain_partitions, load_spec
from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
from encoder_pipeline.lib.encoders import ModelError, load_encoder
from encoder_pipeline.lib.llm import GenerationParams, LLMError, OpenAIBackend
from encoder_pipeline.lib.queries import generate_frame, parse_query
from encoder_pipeline.lib.sources import CorpusError, read_corpus
from encoder_pipeline.lib.train import MIN_TRAINING_PAIRS
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import shared_corpus

ASSETS = {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}


@functools.cache
def documents() -> tuple[dict, ...]:
    """The first 60 web_qa documents; the calling test skips when ../shared/corpora is absent."""
    lines = (shared_corpus("web_qa/python_docs") / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines[:60])


def jsonl(records) -> bytes:
    return b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records)


def spec_for(directory, corpus, corpus_keys: str = "", extra: str = "", fmt: str = "jsonl"):
    """A spec for `corpus`; `corpus_keys` go into its [corpus] table."""
    spec = write_spec(directory, path=str(corpus), extra=extra)
    spec.write_text(spec.read_text().replace('format = "jsonl"', f'format = "{fmt}"\n{corpus_keys}'))
    return spec


def run(assets, root, domains, monkeypatch):
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(domains))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["mine"])
    return dg.materialize(list(ASSETS.values()), selection=list(assets), instance=instance, partition_key="mine",
                          raise_on_error=False, resources={
                              PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(root)),
                              "settings": PipelineSettings(profile="tiny"), "llm": LLMResource()})


def clean(tmp_path, monkeypatch, records=None, corpus_keys="", extra="", corpus=None, fmt="jsonl"):
    """Materialize clean_corpus for a domain `mine` over `records` (JSONL) or `corpus`."""
    (tmp_path / "domains").mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_bytes(jsonl(records))
    spec_for(tmp_path / "domains", corpus, corpus_keys, extra, fmt)
    return run(["clean_corpus"], tmp_path / "artifacts", tmp_path / "domains", monkeypatch)


def failure(result) -> str:
    assert not result.success
    return result.get_step_failure_events()[0].step_failure_data.error.message


def metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events()
               if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


# --- corpus files ----------------------------------------------------------------------------------


def test_empty_corpus_names_the_file(tmp_path, monkeypatch):
    message = failure(clean(tmp_path, monkeypatch, records=[]))
    assert str(tmp_path / "corpus.jsonl") in message and "empty" in message
    assert str(tmp_path / "domains" / "mine.toml") in message


def test_malformed_line_fails_naming_file_and_line(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    broken = [*docs[:6], b'{"_id": "x", "text": "cut off\n', *docs[6:]]
    message = failure(clean(tmp_path, monkeypatch, records=broken))
    assert f"{tmp_path / 'corpus.jsonl'}:7: not valid JSON" in message
    assert 'corpus.on_malformed = "skip"' in message


def test_malformed_lines_skipped_and_counted_when_the_spec_says_so(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    broken = [*docs[:6], b"not json at all\n", b"[1, 2]\n", *docs[6:], b'{"title": "no id"}\n']
    result = clean(tmp_path, monkeypatch, records=broken, corpus_keys='on_malformed = "skip"')
    assert result.success
    meta = metadata(result, "clean_corpus")
    assert meta["skipped_malformed"] == 3 and meta["source_documents"] == len(docs)
    corpus = tmp_path / "corpus.jsonl"
    for line, reason in ((7, "not valid JSON"), (8, "not a JSON object"), (len(broken), "no '_id'")):
        assert f"{corpus}:{line}: {reason}" in meta["skipped_examples"]


def test_non_utf8_bytes_name_the_line_or_file(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    latin1 = docs[3]["text"].encode() + " caf\xe9".encode("latin-1")
    bad = json.dumps({**docs[3], "text": "@@TEXT@@"}).encode().replace(b"@@TEXT@@", latin1) + b"\n"
    message = failure(clean(tmp_path, monkeypatch, records=[*docs[:3], bad, *docs[4:]]))
    assert f"{tmp_path / 'corpus.jsonl'}:4: not valid UTF-8" in message

    folder = tmp_path / "pages"
    folder.mkdir()
    for doc in docs[:20]:
        (folder / f"{doc['_id'].replace('#', '_')}.md").write_text(f"# {doc['title']}\n\n{doc['text']}\n")
    (folder / "latin1.txt").write_bytes(latin1)
    assert "latin1.txt" in failure(clean(tmp_path / "f", monkeypatch, corpus=folder, fmt="files"))
    result = clean(tmp_path / "s", monkeypatch, corpus=folder, fmt="files",
                   corpus_keys='on_malformed = "skip"')
    assert result.success and metadata(result, "clean_corpus")["skipped_malformed"] == 1


def test_duplicate_ids_name_the_field_and_an_id(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    message = failure(clean(tmp_path, monkeypatch, records=[*docs, {**docs[5], "text": "another"}]))
    assert "1 duplicate document ids" in message and "corpus.id_field" in message
    assert repr(docs[5]["_id"]) in message


def test_missing_fields(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    # text: absent from every line -> the field and the fields present are named
    message = failure(clean(tmp_path / "a", monkeypatch, records=[{"_id": d["_id"], "body": d["text"]}
                                                                  for d in docs]))
    assert "text field 'text' not found" in message and "'body'" in message
    # id: absent on one line while the others have it -> that line
    no_id = {k: v for k, v in docs[2].items() if k != "_id"}
    message = failure(clean(tmp_path / "b", monkeypatch, records=[*docs[:2], no_id, *docs[3:]]))
    assert f"{tmp_path / 'b' / 'corpus.jsonl'}:3: no '_id' (corpus.id_field)" in message
    # title: optional; a row without one or without text is read, the empty one dropped and counted
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl([{"_id": "a", "text": docs[0]["text"]}, {"_id": "b", "title": "only"},
                            *docs[1:20]]))
    units, report = clean_corpus(read_corpus("jsonl", str(path)), CleaningConfig(min_words=3))
    assert units.set_index("doc_id").loc["a", "title"] == ""
    assert "b" not in set(units["doc_id"]) and report.counts["dropped_short_or_empty"] >= 1


def test_null_ids_in_a_table_are_refused(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(documents()[:20]).astype({"_id": object})
    frame.loc[4, "_id"] = None
    frame.to_parquet(tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match="1 documents have no id.*corpus.id_field"):
        clean_corpus(read_corpus("parquet", str(tmp_path / "c.parquet")), CleaningConfig())


def test_long_documents_are_chunked_and_counted(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    # thousands of words, far past the encoder's 128-token window
    long_text = " ".join(d["text"] for d in documents()[30:])
    records = [*docs, {"_id": "long", "title": "Everything", "text": long_text}]
    (tmp_path / "domains").mkdir()
    spec = spec_for(tmp_path / "domains", tmp_path / "corpus.jsonl")
    spec.write_text(spec.read_text().replace('name = "paragraph"', 'name = "paragraph"\nmax_words = 120'))
    (tmp_path / "corpus.jsonl").write_bytes(jsonl(records))
    result = run(["clean_corpus"], tmp_path / "artifacts", tmp_path / "domains", monkeypatch)
    table = metadata(result, "clean_corpus")["counts_per_step"]
    chunked = next(line for line in table.splitlines() if "documents_chunked" in line)
    assert int(chunked.strip("| ").split("|")[-1]) >= 1
    units, report = clean_corpus(read_corpus("jsonl", str(tmp_path / "corpus.jsonl")),
                                 CleaningConfig(max_words=120))
    words = [len(r["text"].split()) for r in records]
    assert report.counts["documents_chunked"] == sum(n > 120 for n in words) >= 1
    assert report.counts["units_after_chunking"] == sum(max(1, -(-n // 120)) for n in words)
    pieces = units[units["parent_id"] == "long"]
    assert len(pieces) > 1 and pieces["doc_id"].str.fullmatch(r"long#\d+").all()


def test_judged_set_naming_unknown_documents(tmp_path, monkeypatch):
    docs = list(documents()[:30])
    judged = tmp_path / "judged"
    (judged / "qrels").mkdir(parents=True)
    (judged / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what is it"}) + "\n")
    (judged / "qrels" / "dev.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\t{docs[0]['_id']}\t1\n"
                                              "q1\tnot-in-corpus\t1\n")
    message = failure(clean(tmp_path, monkeypatch, records=docs,
                            extra=f'[judged]\npath = "{judged}"\n'))
    assert "qrels name 1 documents that are not in the corpus" in message
    assert "'not-in-corpus'" in message and "judged.path" in message
    (judged / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tx\thigh\n")
    message = failure(clean(tmp_path / "b", monkeypatch, records=docs,
                            extra=f'[judged]\npath = "{judged}"\n'))
    assert f"{judged / 'qrels' / 'dev.tsv'}:2:" in message


def test_a_bad_judged_query_line_is_named(tmp_path, monkeypatch):
    """README: a bad query line reads `queries.jsonl:LINE: ...`, in clean_corpus's step failure."""
    docs = list(documents()[:30])
    judged = tmp_path / "judged"
    (judged / "qrels").mkdir(parents=True)
    (judged / "qrels" / "dev.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\t{docs[0]['_id']}\t1\n")
    queries = judged / "queries.jsonl"
    queries.write_text(json.dumps({"_id": "q1", "text": "what is it"}) + "\n"
                       + '{"_id": "q2", "text": "cut off\n')
    message = failure(clean(tmp_path, monkeypatch, records=docs, extra=f'[judged]\npath = "{judged}"\n'))
    assert f"{queries}:2: not valid JSON" in message
    queries.write_text(json.dumps({"_id": "q1", "text": "what is it"}) + "\n\n"
                       + json.dumps({"_id": "q3", "title": "no text"}) + "\n")
    message = failure(clean(tmp_path / "b", monkeypatch, records=docs,
                            extra=f'[judged]\npath = "{judged}"\n'))
    assert f"{queries}:3: a query needs _id and text" in message  # blank line 2 still counts


def test_too_small_a_corpus_is_refused_with_the_minimum(tmp_path, monkeypatch):
    """One unit short of the minimum is refused naming the exact count; the minimum itself passes."""
    short = MIN_TRAINING_PAIRS - 1  # short documents: one unit each, none dropped
    message = failure(clean(tmp_path, monkeypatch, records=documents()[:short]))
    assert re.search(rf"\bonly {short} distinct units are left after cleaning \(", message), message
    assert f"at least {MIN_TRAINING_PAIRS} are needed" in message
    result = clean(tmp_path / "enough", monkeypatch, records=documents()[:MIN_TRAINING_PAIRS])
    assert result.success and metadata(result, "clean_corpus")["documents"] == MIN_TRAINING_PAIRS


# --- spec files and models -------------------------------------------------------------------------


def test_unknown_key_and_domain_typo(tmp_path, monkeypatch, capsys):
    spec = spec_for(tmp_path, tmp_path / "c.jsonl", corpus_keys='on_malformd = "skip"')
    with pytest.raises(SpecError, match=r"mine\.toml: field 'corpus\.on_malformd': unknown field"):
        load_spec(spec)
    spec_for(tmp_path, tmp_path / "c.jsonl", corpus_keys='on_malformed = "sometimes"')
    with pytest.raises(SpecError, match=r"field 'corpus\.on_malformed': Input should be 'fail' or 'skip'"):
        load_spec(spec)
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path))
    assert cli.main(["materialize", "--domain", "mnie"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mnie.toml'}: no spec for domain 'mnie' (known domains: mine)" in err


@pytest.fixture
def cli_home(tmp_path, monkeypatch):
    """Throwaway DAGSTER_HOME (sqlite, no daemon), artifact root and spec folder for the CLI."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(tmp_path / "artifacts"))
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    (tmp_path / "domains").mkdir()
    monkeypatch.chdir(tmp_path)  # the CLI moves to the project root; this restores the directory
    return home


def test_cli_domains_lists_an_invalid_spec_and_exits_2(tmp_path, cli_home, capsys):
    """README: `encoder-pipeline domains` lists a spec with an unknown key as INVALID, does not
    register it, and exits with 2 (bad input); the valid spec beside it is listed and registered all the same;
    once its spec file is deleted, its partition goes too."""
    (tmp_path / "good.jsonl").write_text('{"_id": "1", "title": "t", "text": "some words here"}\n')
    write_spec(tmp_path / "domains", name="good", path=str(tmp_path / "good.jsonl"))
    spec_for(tmp_path / "domains", tmp_path / "good.jsonl", corpus_keys='on_malformd = "skip"') \
        .rename(tmp_path / "domains" / "mine.toml")
    assert cli.main(["domains"]) == 2
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert re.match(r"mine\s+INVALID\s+.*mine\.toml: field 'corpus\.on_malformd': unknown field",
                    lines["mine"]), lines["mine"]
    assert "[ok]" in lines["good"] and "INVALID" not in lines["good"]
    with dg.DagsterInstance.from_config(str(cli_home)) as instance:
        assert instance.get_dynamic_partitions(domain_partitions.name) == ["good"]
    (tmp_path / "domains" / "mine.toml").unlink()
    assert cli.main(["domains"]) == 0  # the same folder without the bad spec
    (tmp_path / "domains" / "good.toml").unlink()
    assert cli.main(["domains"]) == 0 and "removed partitions whose spec is gone: good" in capsys.readouterr().out
    with dg.DagsterInstance.from_config(str(cli_home)) as instance:
        assert instance.get_dynamic_partitions(domain_partitions.name) == []


def test_the_exit_codes_are_one_table_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = capsys.readouterr().out
    for code, meaning in ((cli.EXIT_OK, "done"), (cli.EXIT_RUN_FAILED, "a run started and failed"),
                          (cli.EXIT_BAD_INPUT, "bad input"), (cli.EXIT_REFUSED, "the run finished but the promotion gate")):
        assert re.search(rf"^ +{code}  {meaning}", shown, re.MULTILINE), shown


def test_cli_materialize_exits_1_when_the_run_fails(tmp_path, cli_home, capsys):
    """README: the CLI exits with 1 when a run fails (here clean_corpus, on a malformed line that
    only the run reads), after the run was recorded, failed, on the instance; what it prints is a
    line per stage and the failure's reason, not Dagster's event stream."""
    lines = [json.dumps({"_id": f"d{i}", "title": f"title {i}", "text": f"text number {i} of the corpus"})
             for i in range(30)]
    lines.insert(5, '{"_id": "x", "text": "cut off')
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    write_spec(tmp_path / "domains", path=str(tmp_path / "corpus.jsonl"))
    assert cli.main(["materialize", "--domain", "mine", "--profile", "tiny"]) == 1
    printed = capsys.readouterr()
    out = printed.out
    with dg.DagsterInstance.from_config(str(cli_home)) as instance:
        [record] = instance.get_run_records(dg.RunsFilter(job_name="train_encoder_job"))
        health = instance.get_latest_materialization_event(dg.AssetKey("domain_health"))
    # ...and the UI's domain_health, refreshed after the run, names the domain and where it failed
    table = health.asset_materialization.metadata["domains"].value
    assert re.search(r"\| mine +\| failed +\| 0 of 11 +\| failed at clean_corpus", table), table
    assert health.asset_materialization.metadata["domains_failed"].value == 1
    assert f"run {record.dagster_run.run_id}: FAILED" in out
    # a run you can read: a line per stage, the reason in one line, where the full log is; no trace
    assert "clean_corpus: started" in out and re.search(r"clean_corpus: FAILED: .*1 malformed line", out), out
    assert "failed stage: clean_corpus" in printed.err and "--verbose" in printed.err
    assert "Stack Trace" not in out + printed.err and " - DEBUG - " not in out + printed.err
    assert record.dagster_run.status == dg.DagsterRunStatus.FAILURE
    assert record.dagster_run.tags["dagster/partition"] == "mine"


def test_base_model_that_is_missing_or_not_a_model(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path / 'absent'} does not exist"):
        load_encoder(str(tmp_path / "absent"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(ModelError, match=f"{tmp_path / 'notes'} is not a sentence-transformers model"):
        load_encoder(str(tmp_path / "notes"))
    with pytest.raises(ModelError, match="'no-such-org/no-such-model' cannot be loaded.*HF_HUB_OFFLINE"):
        load_encoder("no-such-org/no-such-model")


# --- the LLM ---------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with serving(FakeOpenAIServer()) as srv:
        yield srv


def generate(server, tmp_path, prompts, **backend):
    factory = functools.partial(OpenAIBackend, server.base_url, "fake-model", FAKE_KEY, **backend)
    rows = [{"doc_id": str(i), "prompt": p} for i, p in enumerate(prompts)]
    return generate_frame(rows, factory, str(tmp_path / "cache"), GenerationParams(max_new_tokens=16))


def test_llm_empty_non_text_and_endless_answers_give_no_query(server, tmp_path):
    endless = "how do I " + "keep going " * 50_000  # a server that ignores max_tokens
    answers = {"empty": "", "number": 42, "endless": endless, "list": ["a", "b"],
               "first-line": "how do I sort a list\n" + "and more " * 50_000}
    server.respond = answers.__getitem__
    frame = generate(server, tmp_path, list(answers))
    texts = dict(zip(frame["prompt"], frame["text"], strict=True))
    assert texts["empty"] == texts["number"] == texts["list"] == ""
    assert len(texts["endless"]) <= 16 * 16 and texts["endless"].startswith("how do I keep going")
    parsed = {p: parse_query(t, "a passage", []) for p, t in texts.items()}
    assert parsed == {"empty": None, "number": None, "list": None, "endless": None,
                      "first-line": "how do I sort a list"}
    cached = sorted((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 5 and max(p.stat().st_size for p in cached) < 1000


@pytest.mark.parametrize(("script", "delay_s", "expected"), [
    ([401], 0, r"refused the API key \(HTTP 401\): check ENCODER_PIPELINE_LLM_API_KEY"),
    ([403], 0, r"refused the API key \(HTTP 403\)"),
    ([429, 429], 0, r"still rate-limiting \(HTTP 429\) after 1 retries"),
    ([500, 503], 0, r"failed with HTTP 503 after 1 retries"),
    ([], 1.0, r"did not answer within 0\.2s \(1 retries\)"),
])
def test_llm_endpoint_failures_name_endpoint_and_cause(server, script, delay_s, expected):
    """What the openai client raises after its retries, as the user reads it (LLMBackend.explain)."""
    server.script, server.delay_s = list(script), delay_s
    backend = OpenAIBackend(server.base_url, "fake-model", FAKE_KEY, max_retries=1, timeout_s=0.2)
    with pytest.raises(Exception) as raised:
        backend.generate(["q0"], GenerationParams(max_new_tokens=8))
    explained = backend.explain(raised.value)
    assert isinstance(explained, LLMError)
    assert re.search(expected, str(explained)) and server.base_url in str(explained)
    assert FAKE_KEY not in str(explained)
    assert server.requests == (len(script) or 2)


def test_llm_failure_stops_generation_with_its_cause(server, tmp_path):
    """Through the Daft generator as synthetic_queries runs it: a refused key raises LLMError (not a
    Daft traceback), and no prompt is sent after the refusal."""
    server.script = [401] * 50
    with pytest.raises(LLMError, match=r"refused the API key \(HTTP 401\)"):
        generate(server, tmp_path, [f"q{i}" for i in range(20)], max_concurrency=1)
    assert server.requests == 1


def test_llm_endpoint_404_names_the_status_and_the_servers_message(server, tmp_path):
    """README: other HTTP errors (400, 404: a wrong model name) read `the LLM endpoint URL failed
    with HTTP 404: MESSAGE`, with the server's own message, raised through the Daft generator as
    synthetic_queries runs it. The client does not retry it."""
    expected = rf"the LLM endpoint {re.escape(server.base_url)}/? failed with HTTP 404: [^(]*scripted 404\b"
    server.script = [404] * 20
    with pytest.raises(LLMError) as raised:
        generate(server, tmp_path, [f"q{i}" for i in range(3)], max_concurrency=1, max_retries=2)
    assert re.match(expected, str(raised.value)), str(raised.value)
    assert "retries" not in str(raised.value) and FAKE_KEY not in str(raised.value)

    server.requests, server.script = 0, [404] * 5
    backend = OpenAIBackend(server.base_url, "fake-model", FAKE_KEY, max_retries=2, timeout_s=5)
    with pytest.raises(Exception) as raised:
        backend.generate(["q0"], GenerationParams(max_new_tokens=8))
    assert re.match(expected, str(backend.explain(raised.value)))
    assert server.requests == 1
