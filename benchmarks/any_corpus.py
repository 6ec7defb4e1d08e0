"""A corpus the pipeline has never seen, as a new user brings it: written to JSONL, taken through
`encoder-pipeline domain add` (nothing edited after it) and the main job at a profile and a seed.

    export ENCODER_PIPELINE_CORPUS_ROOT=../shared/corpora
    python benchmarks/any_corpus.py --corpus manual --seed 0
    python benchmarks/any_corpus.py --corpus manual --seed 1 --reuse /tmp/any_corpus/manual-seed0

Corpora (from ../shared/corpora, or $ENCODER_PIPELINE_CORPUS_ROOT):
- `policies`: the `policy-*` paragraphs of legal/privacy_policies, titled by their website.
- `manual`: web_qa/python_docs with every title removed; its FAQ set given through `--judged`.
- `functions`: the running Python's standard-library functions, docstrings inside the code text.
- `bare_functions`: the same functions, docstrings stripped.
- `gene_ontology`: biomedical/gene_ontology (name + definition) without its judged set.

Prints the report's verdict, evidence and its two tables (what users get; the ladder), and writes
`benchmarks/results/any_corpus_<corpus>_<profile>_seed<seed>.json` (figures, seconds per stage, the
chosen index, the device). `--reuse` copies an earlier run's LLM answers and embedding caches (not
its artifacts), so another seed does not pay for what does not depend on the seed.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import shutil
import sysconfig
import textwrap
import time
from pathlib import Path

import dagster as dg
import pandas as pd
from stage_timings import device, step_seconds

from encoder_pipeline import cli
from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.extractors.docstring import split_docstring
from encoder_pipeline.lib.formats.python_stdlib import ALWAYS_EXCLUDED
from encoder_pipeline.lib.layout import EVAL_REPORT, REPORT_FILE, SERVING_INDEX
from encoder_pipeline.paths import corpus_root
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)

RESULTS = Path(__file__).parent / "results"
CACHES = ("_llm_cache", "_embeddings")


def _beir(relative: str) -> pd.DataFrame:
    return pd.read_json(corpus_root() / relative / "corpus.jsonl", lines=True, dtype={"_id": str})


def _functions(strip_docstrings: bool) -> list[dict]:
    """Every function of the standard library (the `code` domain's exclusions), as its source text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & set(ALWAYS_EXCLUDED + ("lib2to3", "ensurepip", "turtledemo")):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                code = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
                rows.append({"id": f"{path.relative_to(root)}:{node.name}:{node.lineno}",
                             "code": split_docstring(code)[1] if strip_docstrings else code})
    return rows


def _write_rows(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build(name: str, folder: Path) -> list[str]:
    """Write corpus `name` under `folder`; the `domain add` arguments for it."""
    if name == "policies":
        corpus = _beir("legal/privacy_policies")
        corpus[corpus["_id"].str.startswith("policy-")].to_json(folder / "policies.jsonl", orient="records",
                                                                lines=True)
        return ["--corpus", str(folder / "policies.jsonl")]
    if name == "manual":
        _beir("web_qa/python_docs").assign(title="").to_json(folder / "manual.jsonl", orient="records",
                                                              lines=True)
        return ["--corpus", str(folder / "manual.jsonl"), "--judged", str(corpus_root() / "web_qa/python_docs")]
    if name in ("functions", "bare_functions"):
        _write_rows(_functions(strip_docstrings=name == "bare_functions"), folder / f"{name}.jsonl")
        return ["--corpus", str(folder / f"{name}.jsonl"), "--id-field", "id", "--text-field", "code"]
    if name == "gene_ontology":
        _beir("biomedical/gene_ontology").to_json(folder / "gene_ontology.jsonl", orient="records", lines=True)
        return ["--corpus", str(folder / "gene_ontology.jsonl")]
    raise SystemExit(f"unknown corpus {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True,
                        choices=["policies", "manual", "functions", "bare_functions", "gene_ontology"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="folder for the corpus, spec and artifacts "
                        "(default /tmp/any_corpus/<corpus>-seed<seed>; must not exist)")
    parser.add_argument("--reuse", type=Path, help="an earlier --work folder of the same corpus: its "
                        "LLM answers and embedding caches are copied in first")
    args = parser.parse_args()
    work = args.work or Path("/tmp/any_corpus") / f"{args.corpus}-seed{args.seed}"
    if work.exists():
        parser.error(f"{work} exists: start from a fresh folder")
    work.mkdir(parents=True)
    os.environ["ENCODER_PIPELINE_DOMAINS"] = str(work / "domains")
    os.environ["DAGSTER_HOME"] = str(work / "dagster")
    (work / "dagster").mkdir()
    added = io.StringIO()
    with contextlib.redirect_stdout(added):
        code = cli.main(["domain", "add", args.corpus, *build(args.corpus, work)])
    print(added.getvalue())
    if code:
        raise SystemExit(f"domain add refused the corpus (exit {code})")
    root = work / "artifacts"
    for cache in CACHES if args.reuse else ():
        if (args.reuse / "artifacts" / args.corpus / cache).exists():
            shutil.copytree(args.reuse / "artifacts" / args.corpus / cache, root / args.corpus / cache)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [args.corpus])
    started = time.perf_counter()
    result = defs.resolve_job_def("train_encoder_job").execute_in_process(
        instance=instance, partition_key=args.corpus, raise_on_error=False, resources={
            PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(root)),
            "settings": PipelineSettings(profile=args.profile, seed=args.seed), "llm": LLMResource()})
    total = time.perf_counter() - started
    store = ArtifactStore(root)
    report_folder = store.latest(args.corpus, EVAL_REPORT)
    report = json.loads((report_folder / REPORT_FILE).read_text())
    page = (report_folder / "report.md").read_text()
    print(page.split("## Index sweep")[0])
    served = report["significance_vs_off_the_shelf"].get("served_index", {})
    figures = {
        "corpus": args.corpus, "profile": args.profile, "seed": args.seed, "device": device(),
        "total_seconds": total, "stages": step_seconds(instance, result), "promoted": SERVING_INDEX in {
            e.asset_key.to_user_string() for e in result.get_asset_materialization_events()},
        "verdict": report["verdict"], "evidence": report["evidence"], "dev_evidence": report.get("dev_evidence"),
        "eval_queries": report.get("eval_queries"), "dev_queries": report.get("dev_queries"),
        "notes": report.get("eval_notes", []),
        "served": {"ndcg@10": report["after"]["ndcg@10"], "rung": report["after"].get("rung"),
                   "dims": report["after"].get("dims"), "precision": report["after"].get("precision")},
        "off_the_shelf_ndcg@10": report["before"]["ndcg@10"],
        "served_vs_off_the_shelf": served,
        "ladder": {name: row["ndcg@10"] for name, row in report["ladder"].items()},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"any_corpus_{args.corpus}_{args.profile}_seed{args.seed}.json"
    out.write_text(json.dumps(figures, indent=2))
    print(f"{total / 60:.1f} min end to end; {out}")


if __name__ == "__main__":
    main()
