"""Any corpus trains, with nothing edited after `encoder-pipeline domain add`: (a) privacy-policy
paragraphs titled by their website, (b) the Python manual with every title removed and its FAQ as the
judged set, (c) standard-library functions dumped to JSONL with their docstrings inside the code,
(d) the same functions without docstrings. Each goes through `domain add` (which chooses the
extractors) and the data stages at tiny scale; (b) goes on to the report with the local LLM, the others
use the stand-in LLM server (conftest.stand_in_llm): the extractors and the graph are under test."""

import ast
import contextlib
import io
import json
import sysconfig
import textwrap
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline import cli
from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions, load_domain
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.extractors.docstring import split_docstring
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets, shared_corpus

pytestmark = pytest.mark.slow
DATA_STAGES = ["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives"]
CODE_MODULES = ["textwrap.py", "base64.py", "csv.py", "fnmatch.py", "glob.py", "json/decoder.py"]


def _policies(folder: Path) -> Path:
    corpus = pd.read_json(shared_corpus("legal/privacy_policies") / "corpus.jsonl", lines=True, dtype={"_id": str})
    path = folder / "policies.jsonl"
    corpus[corpus["_id"].str.startswith("policy-")].head(100).to_json(path, orient="records", lines=True)
    return path


def _untitled_manual(folder: Path) -> Path:
    source = shared_corpus("web_qa/python_docs")
    corpus = pd.read_json(source / "corpus.jsonl", lines=True, dtype={"_id": str})
    judged = set(pd.read_csv(source / "qrels" / "dev.tsv", sep="\t", dtype=str)["corpus-id"])
    kept = pd.concat([corpus[corpus["_id"].isin(judged)], corpus[~corpus["_id"].isin(judged)].head(100)])
    path = folder / "manual.jsonl"
    kept.assign(title="").to_json(path, orient="records", lines=True)
    return path


def _functions(strip_docstrings: bool) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for module in CODE_MODULES:
        source = (root / module).read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                code = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
                rows.append({"id": f"{module}:{node.name}:{node.lineno}",
                             "code": split_docstring(code)[1] if strip_docstrings else code})
    return rows


def _code(folder: Path, strip_docstrings: bool) -> Path:
    path = folder / f"functions{'_bare' if strip_docstrings else ''}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _functions(strip_docstrings)))
    return path


CORPORA = {  # name: (build, domain add arguments beyond the corpus, expected extractors, code?)
    "policies": (_policies, [], ["inverse_cloze", "cropping"], False),
    "manual": (_untitled_manual, ["--judged", "JUDGED"], ["inverse_cloze", "cropping"], False),
    # ~90 functions: too few docstrings for 500 structural pairs, so spans are cropped as well
    # a JSONL dump with `id` and `code` columns: both found without a flag
    "functions": (lambda f: _code(f, False), [], ["docstring", "cropping"], True),
    "bare_functions": (lambda f: _code(f, True), [], ["cropping"], True),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, stand_in_llm):
    """Per corpus, once: `domain add` (its printout) and the data stages (their result), in a
    workspace of its own (spec folder, artifact root, Dagster home)."""
    runs = {}

    def build(name: str) -> tuple[Path, str, dg.ExecuteInProcessResult]:
        if name not in runs:
            workspace = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as patch:
                _enter(workspace, patch)
                printed = _add(name, workspace)
                llm = LLMResource() if name == "manual" else stand_in_llm
                runs[name] = workspace, printed, _materialize(name, workspace, DATA_STAGES, llm)
        return runs[name]
    return build


def _enter(workspace: Path, patch: pytest.MonkeyPatch) -> None:
    patch.setenv("ENCODER_PIPELINE_DOMAINS", str(workspace / "domains"))
    patch.setenv("ENCODER_PIPELINE_HOME", str(workspace / "home"))
    patch.setenv("DAGSTER_HOME", str(workspace / "dagster"))
    (workspace / "dagster").mkdir(exist_ok=True)
    patch.chdir(workspace)


def _add(name: str, workspace: Path) -> str:
    build, extra, _, _ = CORPORA[name]
    corpus = build(workspace)
    extra = [str(shared_corpus("web_qa/python_docs")) if arg == "JUDGED" else arg for arg in extra]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["domain", "add", name, "--corpus", str(corpus), *extra]) == 0
    return printed.getvalue()


def _materialize(name: str, workspace: Path, assets: list[str], llm: LLMResource) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [name])
    return dg.materialize(graph_assets(), selection=assets, instance=instance, partition_key=name,
                          raise_on_error=False, resources={
        PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(workspace / "home")),
        "settings": PipelineSettings(profile="tiny"), "llm": llm})


@pytest.mark.parametrize("name", list(CORPORA))
def test_domain_add_chooses_the_extractors_and_the_data_stages_run_unedited(name, built, monkeypatch):
    workspace, printed, result = built(name)
    _enter(workspace, monkeypatch)
    _, _, expected, code = CORPORA[name]
    spec = load_domain(name)
    assert spec.queries.pair_extractor == expected, printed
    assert f"training pairs from: {', '.join(expected)}" in printed
    if code:  # the dump's own columns, found without a flag
        assert (spec.corpus.id_field, spec.corpus.text_field) == ("id", "code"), printed
    assert spec.unit.normalize_whitespace is not code and (spec.unit.max_words == 0) is code
    assert not spec.queries.examples  # nothing hand-written: built-in and corpus examples stand in
    text = Path(spec.source_file).read_text()
    assert "# What each extractor found on a sample of the corpus:" in text and "title:" in text

    assert result.success, [e.step_failure_data.error.message for e in result.get_step_failure_events()]
    store = ArtifactStore(workspace / "home")
    split = json.loads((store.latest(name, "eval_set") / "eval_set.json").read_text())
    assert split["eval"]["evidence"] == ("human" if name == "manual" else "synthetic")
    assert split["eval"]["queries"] and split["dev"]["queries"]
    pairs = pd.read_parquet(store.latest(name, "heuristic_pairs") / "pairs.parquet")
    assert len(pairs) > 0 and set(pairs["extractor"]) <= set(expected)
    prompts = json.loads((store.latest(name, "synthetic_queries") / "generation.json").read_text())
    assert prompts["prompts"] > 0
    checks = [c for c in result.get_asset_check_evaluations() if c.check_name == "no_eval_leakage"]
    assert len(checks) == 3 and all(c.passed for c in checks)


def test_an_untitled_corpus_goes_end_to_end_to_a_report(built, monkeypatch):
    workspace, _, _ = built("manual")
    _enter(workspace, monkeypatch)
    rest = [a.key.to_user_string() for a in defs.assets if isinstance(a, dg.AssetsDefinition)
            and a.key.to_user_string() not in DATA_STAGES]
    result = _materialize("manual", workspace, rest, LLMResource())
    report_events = [e for e in result.get_asset_materialization_events()
                     if e.asset_key.to_user_string() == "eval_report"]
    assert report_events, [e.step_failure_data.error.message for e in result.get_step_failure_events()]
    report = json.loads((ArtifactStore(workspace / "home").latest("manual", "eval_report")
                         / "report.json").read_text())
    assert report["evidence"] == "human" and report["dev_evidence"] == "synthetic"
    assert "human-judged" in report["evidence_words"] and report["verdict"]
    assert 0.0 < report["after"]["ndcg@10"] <= 1.0
