"""Serving, on a real tiny `code` build: the search CLI and Python API, export with a model card, and
the ONNX int8 query encoder (skipped when onnx / onnxruntime are not installed). What is served is
the build's promoted candidate, or, when its report refused it, the same candidate forced
(conftest's tiny_code_served checks the refusal first)."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from encoder_pipeline import cli
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.index import load_index
from encoder_pipeline.lib.metrics import evaluate
from encoder_pipeline.lib.search import DomainNotBuilt, Hit, NothingServed, Searcher, served_index


@pytest.fixture(scope="module")
def built(tiny_code_served) -> ArtifactStore:
    """The session's tiny `code` build with its candidate served (conftest)."""
    return tiny_code_served.store


@pytest.fixture
def home(built, monkeypatch) -> ArtifactStore:
    """The CLI reads the artifact root from ENCODER_PIPELINE_HOME."""
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(built.root))
    return built


@pytest.fixture(scope="module")
def known(built) -> tuple[str, str]:
    """A query with a known answer, whatever the tiny training and the index width did: a function's
    own name and code (a training pair's positive) and the function's id."""
    pairs = pd.read_parquet(built.latest("code", "heuristic_pairs") / "pairs.parquet")
    row = pairs.sort_values("doc_id").iloc[0]
    return str(row["positive"]), str(row["doc_id"])


def test_search_cli_returns_the_known_document(home, known, capsys):
    query, doc_id = known
    assert cli.main(["search", "--domain", "code", query, "-k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in payload["hits"]] == [1, 2, 3]
    assert doc_id in [h["id"] for h in payload["hits"]]
    scores = [h["score"] for h in payload["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert payload["served"]["revision"] == served_index("code", home).revision

    assert cli.main(["search", "--domain", "code", *query.split(), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["rank", "score", "id", "title"]
    assert len(lines) == 5 and any(line.split()[2] == doc_id for line in lines[2:])
    assert "note: the query is" not in capsys.readouterr().err

    assert cli.main(["search", "--domain", "code", " ".join([query] * 200), "-k", "1"]) == 0
    assert re.search(r"note: the query is \d+ tokens; the encoder reads its first 128", capsys.readouterr().err)


def test_search_api_agrees_with_the_report(built, known):
    searcher = Searcher.for_domain("code", built)
    query, doc_id = known
    hits = searcher.search(query, k=5)
    assert len(hits) == 5 and all(isinstance(h, Hit) for h in hits)
    assert doc_id in [h.id for h in hits[:3]]
    assert hits[0].title and hits[0].parent_id
    # The held-out eval queries, searched as users search and scored as the report scores (documents
    # ranked by their best unit over the top 100): exactly the report's figures for the served index
    # (its 30 queries are one encoding batch here as there, so even bf16 rounding is the same).
    split = json.loads((built.latest("code", "eval_set") / "eval_set.json").read_text())
    qids = list(split["eval"]["queries"])
    results = searcher.search_many([split["eval"]["queries"][q] for q in qids], k=100)
    run: dict[str, dict[str, float]] = {q: {} for q in qids}
    for qid, hits in zip(qids, results, strict=True):
        for hit in hits:  # best first: a document scores as its best unit
            run[qid].setdefault(hit.parent_id, hit.score)
    means, _ = evaluate(run, split["eval"]["qrels"])
    report = json.loads((built.latest("code", "eval_report") / "report.json").read_text())
    assert means == {metric: report["after"][metric] for metric in means}


def test_the_served_index_holds_every_unit_not_only_the_training_sample(home, built, capsys):
    """Training runs on the profile's sample (250 documents at tiny scale); the index, `search` and
    the report cover the whole cleaned corpus (~640 functions here), so a function outside the
    sample is found."""
    units = pd.read_parquet(built.latest("code", "clean_corpus") / "corpus.parquet")
    outside = units[~units["in_sample"] & units["duplicate_of"].isna()]  # a duplicate's original may win
    assert len(outside) > units["in_sample"].sum()  # most of the corpus is outside the sample
    searcher = Searcher.for_domain("code", built)
    assert searcher.index.index.ntotal == len(units)
    described = searcher.describe()
    assert (described["documents"], described["corpus_units"]) == (len(units), len(units))
    unit = outside.sort_values("doc_id").iloc[len(outside) // 2]
    hits = searcher.search(f"{unit['title']}\n{unit['text']}", k=10)
    assert unit["doc_id"] in [hit.id for hit in hits]
    report = json.loads((built.latest("code", "eval_report") / "report.json").read_text())
    assert report["haystacks"]["corpus"]["units"] == len(units) > report["haystacks"]["sample"]["units"]
    assert report["systems"]["served_index"]["haystack"] == "corpus"
    assert cli.main(["search", "--domain", "code", "parse a date"]) == 0
    assert f"{len(units):,} units of the corpus's {len(units):,}" in capsys.readouterr().out


def test_search_names_the_command_for_an_unbuilt_domain(home, capsys):
    assert cli.main(["search", "--domain", "web_qa", "what is a decorator"]) == 2
    assert "encoder-pipeline materialize --domain web_qa" in capsys.readouterr().err
    with pytest.raises(DomainNotBuilt, match="served here: code"):
        Searcher.for_domain("web_qa", home)
    # a name no spec has gets no suggestion that would be refused, but what is wrong with it
    assert cli.main(["search", "--domain", "MyDocs", "what is a decorator"]) == 2
    error = capsys.readouterr().err
    assert "use lowercase letters" in error and "materialize" not in error
    assert cli.main(["search", "--domain", "nodocs", "what is a decorator"]) == 2
    assert "no spec for domain 'nodocs' (known domains:" in capsys.readouterr().err


def test_only_serving_index_is_served_and_a_moved_root_still_loads(built, known, tmp_path):
    """A candidate `embedding_index` is never searched in place of a promotion; a model path
    recorded under an old artifact root is found again under the store's root."""
    import shutil

    served = served_index("code", built)
    rung_dir = served.model_path.parent
    store = ArtifactStore(tmp_path / "moved")
    moved_model = store.root / "code" / rung_dir.parent.name / rung_dir.name / "model"
    moved_model.parent.mkdir(parents=True)
    moved_model.symlink_to(served.model_path, target_is_directory=True)
    old_root_path = f"/old/root/{moved_model.relative_to(store.root)}"
    for asset in ("embedding_index", "serving_index"):
        folder = store.asset_dir("code", asset) / "v1"
        shutil.copytree(served.index_dir, folder)
        (folder / "choice.json").write_text(json.dumps({**served.choice, "model_path": old_root_path}))
        (store.asset_dir("code", asset) / "LATEST").write_text("v1")
        if asset == "embedding_index":  # a loadable candidate, no promotion yet: nothing is served
            with pytest.raises(NothingServed, match="no index has been promoted.*embedding_index v1"):
                Searcher.for_domain("code", store)
    searcher = Searcher.for_domain("code", store)
    assert searcher.served.asset == "serving_index" and searcher.served.model_path == moved_model
    assert known[1] in [h.id for h in searcher.search(known[0], k=3)]


def test_export_writes_a_loadable_model_with_a_card(home, known, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "code-encoder"
    assert cli.main(["export", "--domain", "code", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "all-MiniLM-L6-v2" in card and "nDCG@10" in card and "PSF" in card
    report = json.loads((home.latest("code", "eval_report") / "report.json").read_text())
    assert f"{report['after']['ndcg@10']:.4f}" in card and report["verdict"] in card
    # a refused candidate served with --force is exported with that said
    assert ("promoted with `--force` over its report's refusal" in card) is (not report["promotion"]["safe"])

    served = served_index("code", home)
    exported = SentenceTransformer(str(out), device="cpu")
    query, _ = known
    original = encoders.encode(encoders.load_encoder(str(served.model_path)), [query], bf16=False)
    assert np.allclose(encoders.encode(exported, [query], bf16=False), original, atol=1e-5)
    # The same revision as the served index: the index accepts the exported folder.
    assert load_index(served.index_dir, encoders.model_fingerprint(str(out))).index.ntotal > 0
    assert cli.main(["export", "--domain", "code", "--out", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces an earlier export, and refuses to delete what no export wrote
    assert cli.main(["export", "--domain", "code", "--out", str(out), "--overwrite"]) == 0
    (out / "my_notes.txt").write_text("mine")
    assert cli.main(["export", "--domain", "code", "--out", str(out), "--overwrite"]) == 2
    assert "holds 1 files an export did not write (my_notes.txt)" in capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "README.md").exists()


def test_onnx_int8_query_encoder_matches_torch(built, known, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    served = served_index("code", built)
    split = json.loads((built.latest("code", "eval_set") / "eval_set.json").read_text())
    queries = list(split["eval"]["queries"].values())[:20] + [known[0]]
    torch_model = encoders.load_encoder(str(served.model_path))
    onnx_model = encoders.load_encoder(str(served.model_path), backend="onnx-int8", onnx_cache=tmp_path)
    reference = encoders.encode(torch_model, queries, bf16=False)
    quantized = encoders.encode(onnx_model, queries, bf16=False)
    one_by_one = np.vstack([encoders.encode(onnx_model, [q], batch_size=1) for q in queries])
    assert quantized.shape == one_by_one.shape == reference.shape
    # One query at a time (as served) and batched: dynamic quantization scales activations per
    # batch, so the two differ slightly, and both stay close to the torch embedding.
    for vectors in (one_by_one, quantized):
        cosine = np.sum(vectors * reference, axis=1)
        assert cosine.mean() > 0.98 and cosine.min() > 0.97
    # Exported once, into the cache folder keyed by the model's revision; loaded from there after.
    exported = sorted(tmp_path.rglob("*.onnx"))
    assert {p.name for p in exported} == {encoders.ONNX_FILE, encoders.ONNX_INT8_FILE}
    assert exported[0].parent.parent.name == served.revision
    searcher = Searcher.for_domain("code", built, backend="onnx-int8", onnx_cache=tmp_path)
    assert known[1] in [h.id for h in searcher.search(known[0], k=3)]
    assert sorted(tmp_path.rglob("*.onnx")) == exported and searcher.encoder is onnx_model
