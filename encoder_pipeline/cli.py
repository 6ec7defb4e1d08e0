"""`encoder-pipeline`: run the main job for a domain, list domains, search or export what it serves.

    encoder-pipeline materialize --domain code            # the whole graph for one partition
    encoder-pipeline materialize --domain code --profile tiny
    encoder-pipeline domains                              # validate specs, register partitions
    encoder-pipeline domain add mine --corpus ./docs      # a spec for your own corpus
    encoder-pipeline search --domain code "parse a date"  # query the served index (-k 10, --json)
    encoder-pipeline export --domain code --out DIR       # the served encoder + a model card
    encoder-pipeline rollback --domain code               # serve the previously promoted index again
    encoder-pipeline promote --domain code [--version V]  # promote the candidate, or serve V again
    encoder-pipeline promote --domain code --force        # serve a candidate its report refused
    encoder-pipeline gc --domain code --keep 3 --dry-run  # what older artifacts would be deleted
    encoder-pipeline backfill --domains all               # a Dagster backfill, run by the daemon
    encoder-pipeline judge --domain code [--queries F]    # label relevance in a local page: your judged set

Runs go through the project's Dagster instance (DAGSTER_HOME defaults to the project root), so
they show in the UI with their lineage and metadata.

Exit codes (every command):
    0  done
    1  a run started and failed (its log above; the run in the UI)
    2  bad input, refused before anything ran: a spec, a corpus, a domain name, an argument
    3  the run finished but the promotion gate (safe_to_promote) kept the candidate from serving
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from encoder_pipeline.lib.formats import REGISTRY as FORMATS
from encoder_pipeline.paths import ensure_dagster_home, project_root
from encoder_pipeline.profiles import PROFILES

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3  # the table in the module doc


def _instance():
    import dagster as dg

    ensure_dagster_home()
    os.chdir(project_root())  # dagster.yaml's storage paths are relative to the project root
    return dg.DagsterInstance.get()


def sync_domain_partitions(instance, remove: bool = False) -> tuple[list[str], list[str]]:
    """Register a partition for every valid spec file (what the spec sensor does on each tick) and,
    with `remove` (`domains`), drop those whose spec file is gone: (added, removed)."""
    from encoder_pipeline.domains import domain_partitions, partition_sync

    sync = partition_sync(instance.get_dynamic_partitions(domain_partitions.name))
    if sync.add:
        instance.add_dynamic_partitions(domain_partitions.name, sync.add)
    for name in sync.remove if remove else []:
        instance.delete_dynamic_partition(domain_partitions.name, name)
    return sync.add, sync.remove if remove else []


def cmd_domains(args: argparse.Namespace) -> int:
    from encoder_pipeline.domains import SpecError, domain_names, load_domain

    failures = 0
    for name in domain_names():
        try:
            spec = load_domain(name)
        except SpecError as error:
            failures += 1
            print(f"{name:12s} INVALID  {error}")
            continue
        corpus_format, location = FORMATS[spec.corpus.format], spec.corpus_location()
        status = "ok" if corpus_format.present(location) else "corpus missing (set ENCODER_PIPELINE_CORPUS_ROOT)"
        print(f"{name:12s} {spec.corpus.format:14s} {corpus_format.describe(location)}  [{status}]")
    added, removed = sync_domain_partitions(_instance(), remove=True)
    if added:
        print(f"registered partitions: {', '.join(added)}")
    if removed:
        print(f"removed partitions whose spec is gone: {', '.join(removed)} (their artifacts stay "
              "until `encoder-pipeline gc`)")
    if failures:
        print("invalid specs are not registered as partitions: fix them and run `encoder-pipeline domains`")
    return EXIT_BAD_INPUT if failures else EXIT_OK


def _read_as_the_run_will(spec) -> list[str]:
    """clean_corpus's reading and cleaning of the new domain, in a scratch folder: raises what the
    run would raise (CorpusError, the same message), else returns what cleaning will change."""
    import pandas as pd

    from encoder_pipeline.defs.corpus.assets import clean_domain_corpus
    from encoder_pipeline.lib.corpus_summary import cleaning_warnings
    from encoder_pipeline.lib.sources import Skipped
    from encoder_pipeline.resources import PipelineSettings

    skipped = Skipped()
    with tempfile.TemporaryDirectory(prefix="domain-add-") as scratch:
        units = Path(scratch) / "units.parquet"
        _, report = clean_domain_corpus(spec, PipelineSettings(), units, skipped)
        return cleaning_warnings(pd.read_parquet(units, columns=["parent_id"]), report.counts, skipped.count)


def cmd_materialize(args: argparse.Namespace) -> int:
    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import SpecError, load_domain

    try:
        load_domain(args.domain)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from encoder_pipeline.run_output import stage_logger_defs

    instance = _instance()
    sync_domain_partitions(instance)
    job = defs.resolve_job_def("train_encoder_job")
    run_config = {"resources": {"settings": {"config": {"profile": args.profile, "seed": args.seed}}}}
    stages = None
    if not args.verbose:  # one line per stage instead of Dagster's event stream
        logger_defs, logger_config, stages = stage_logger_defs()
        job, run_config = job.with_logger_defs(logger_defs), {**run_config, **logger_config}
    result = job.execute_in_process(instance=instance, partition_key=args.domain,
                                    run_config=run_config, raise_on_error=False)
    print(f"run {result.run_id}: {'success' if result.success else 'FAILED'}")
    _refresh_domain_health(instance)
    if stages is not None and stages.failed and not stages.refused:
        for step, reason in stages.failed.items():
            print(f"failed stage: {step}\nreason: {reason}", file=sys.stderr)
        print(f"full log: `encoder-pipeline materialize --domain {args.domain} --verbose`, or run "
              f"{result.run_id} in the UI (`dagster dev`)", file=sys.stderr)
    reported = any(e.asset_key.to_user_string() == "eval_report"
                   for e in result.get_asset_materialization_events())
    from encoder_pipeline.lib.layout import read_report
    from encoder_pipeline.resources import ArtifactStoreResource

    store = ArtifactStoreResource().store()
    if reported:
        report_dir = store.latest(args.domain, "eval_report")
        print((report_dir / "report.md").read_text())
        print(f"report: {report_dir}")
        print(f"verdict: {read_report(store, args.domain)['verdict']}")
    blocked = [c for c in result.get_asset_check_evaluations()
               if c.check_name == "safe_to_promote" and not c.passed]
    if blocked:
        print(not_promoted_message(store, args.domain), file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK if result.success else EXIT_RUN_FAILED


def _refresh_domain_health(instance) -> None:
    """The UI's domain_health after a run that no daemon watched (this in-process one); quiet: its
    failure is logged in the instance and never changes the command's outcome."""
    from encoder_pipeline.definitions import defs

    defs.resolve_job_def("domain_health_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})


def not_promoted_message(store, domain: str) -> str:
    """After `safe_to_promote` failed: why, and what `search` serves now (an earlier promotion, or
    nothing, with the command that serves the refused candidate anyway)."""
    from encoder_pipeline.lib.layout import read_report
    from encoder_pipeline.lib.search import NothingServed, served_index

    try:
        served = served_index(domain, store)
    except NothingServed as nothing:
        return f"not promoted (check safe_to_promote), and nothing is served: {nothing}"
    reason = read_report(store, domain)["promotion"]["reason"]
    return (f"{reason} (check safe_to_promote); `search` keeps serving serving_index {served.version} "
            f"({served.choice.get('rung')}, {served.choice.get('precision')}@{served.choice.get('dims')})")


def cmd_domain_add(args: argparse.Namespace) -> int:
    from encoder_pipeline.domains import SpecError, add_domain, new_spec_text
    from encoder_pipeline.lib.corpus_summary import (
        detect_format,
        detect_id_field,
        detect_text_field,
        mappable_fields,
        summarize_corpus,
    )
    from encoder_pipeline.lib.sources import CorpusError

    def local(path: str | None) -> str | None:  # user paths are taken from where the command runs
        return path if path is None or "://" in path else os.path.abspath(path)

    corpus, judged = local(args.corpus), local(args.judged)
    door: list[str] = []
    try:
        fmt = args.format or detect_format(corpus)
        fields = [] if args.id_field and args.text_field else mappable_fields(fmt, corpus)  # read once
        id_field = args.id_field or detect_id_field(fields)
        text_field = args.text_field or detect_text_field(fields, id_field, args.title_field)
        summary = summarize_corpus(fmt, corpus, id_field, args.title_field, text_field, judged,
                                   on_malformed=args.on_malformed)
        spec = add_domain(args.name, new_spec_text(
            args.name, fmt, corpus, id_field=id_field, title_field=args.title_field,
            text_field=text_field, judged=judged, description=args.description,
            extractors=summary.choice.keys, extractor_notes=summary.choice.notes,
            code=summary.choice.code, on_malformed=args.on_malformed), overwrite=args.force,
            check=lambda spec: door.extend(_read_as_the_run_will(spec)))
    except (CorpusError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        print("nothing was written or registered", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.name}: {fmt} corpus at {corpus}" + (f" (ids from field '{id_field}', text from field "
                                                       f"'{text_field}')" if FORMATS[fmt].uses_fields else ""))
    for line in summary.lines():
        print(f"  {line}")
    for warning in door:
        print(f"  warning: {warning}")
    added, _ = sync_domain_partitions(_instance())
    print(f"spec written to {spec.source_file}; partition "
          f"{'registered' if args.name in added else 'already registered'} (it shows in the UI now)")
    print(f"review its targets, then: encoder-pipeline materialize --domain {args.name}")
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from encoder_pipeline.lib.artifacts import MissingArtifact
    from encoder_pipeline.lib.index import EncoderMismatch
    from encoder_pipeline.lib.search import DomainNotBuilt, Searcher

    query = " ".join(args.query).strip()
    if not query:
        print("error: empty query", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        searcher = Searcher.for_domain(args.domain, backend=args.backend)
        hits = searcher.search(query, k=args.k)
    except DomainNotBuilt as error:
        print(f"error: {_unknown_domain(args.domain) or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MissingArtifact, EncoderMismatch, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    tokens, read = searcher.query_tokens(query)
    if tokens > read:
        print(f"note: the query is {tokens} tokens; the encoder reads its first {read}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": query, "served": searcher.describe(), "hits": [
            {"rank": rank, "score": round(hit.score, 6), "id": hit.id, "parent_id": hit.parent_id,
             "title": hit.title} for rank, hit in enumerate(hits, 1)]}, indent=2))
        return EXIT_OK
    served = searcher.describe()
    of_corpus = (f" of the corpus's {served['corpus_units']:,} ({served['corpus_documents']:,} documents)"
                 if served["corpus_units"] is not None else "")
    print(f"# {served['domain']}: {served['rung']} (revision {served['revision']}), "
          f"{served['precision']}@{served['dims']}, {served['documents']:,} units{of_corpus}, "
          f"{served['asset']} {served['version']}")
    width = max([len(h.id) for h in hits] + [2])
    print(f"{'rank':>4}  {'score':>6}  {'id':<{width}}  title")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit.score:6.3f}  {hit.id:<{width}}  {hit.title}")
    return EXIT_OK


def _unknown_domain(name: str) -> str | None:
    """Why `name` is no domain (a bad name, no spec: naming the known ones), else None. Said instead
    of "build it with materialize --domain NAME" when that command would be refused too."""
    from encoder_pipeline.domains import SpecError, load_domain

    try:
        load_domain(name)
    except SpecError as error:
        return str(error)
    return None


def cmd_export(args: argparse.Namespace) -> int:
    from encoder_pipeline.lib.artifacts import MissingArtifact
    from encoder_pipeline.lib.export import ExportError, export_model
    from encoder_pipeline.lib.search import DomainNotBuilt

    try:
        folder = export_model(args.domain, args.out, overwrite=args.overwrite)
    except DomainNotBuilt as error:
        print(f"error: {_unknown_domain(args.domain) or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MissingArtifact, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {args.domain} encoder to {folder} (model card: {folder / 'README.md'})")
    return EXIT_OK


def _record_serving_change(domain: str, before: str, after: str, action: str) -> None:
    """Note a pointer move on serving_index's timeline in the UI (no run materializes it)."""
    import dagster as dg

    _instance().report_runless_asset_event(dg.AssetObservation(
        asset_key="serving_index", partition=domain,
        metadata={"action": action, "served_version": after, "previous_version": before}))


def _record_judged_set(domain: str) -> None:
    """Show the judged set's new size on eval_set's timeline in the UI now, not at the next run."""
    import dagster as dg

    from encoder_pipeline.defs.corpus.assets import judged_set_metadata
    from encoder_pipeline.domains import load_domain

    metadata = judged_set_metadata(load_domain(domain))  # the spec now points at the judged folder
    if metadata:
        _instance().report_runless_asset_event(dg.AssetObservation(
            asset_key="eval_set", partition=domain, metadata=metadata))


def cmd_rollback(args: argparse.Namespace) -> int:
    from encoder_pipeline.lib.promotion import PromotionError, rollback
    from encoder_pipeline.lib.search import NothingServed
    from encoder_pipeline.resources import ArtifactStoreResource

    try:
        before, after = rollback(ArtifactStoreResource().store(), args.domain)
    except (NothingServed, PromotionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _record_serving_change(args.domain, before, after, "rollback")
    print(f"{args.domain}: now serving serving_index {after} (was {before})")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    import dagster as dg

    from encoder_pipeline.lib.promotion import PromotionError, promote
    from encoder_pipeline.lib.search import NothingServed
    from encoder_pipeline.resources import ArtifactStoreResource

    if args.version and args.force:
        print("error: give --force (promote the latest candidate over its report's refusal) or "
              "--version (serve an earlier promotion again), not both", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.version:
        try:
            before, after = promote(ArtifactStoreResource().store(), args.domain, args.version)
        except (NothingServed, PromotionError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if before != after:
            _record_serving_change(args.domain, before, after, "promote")
        print(f"{args.domain}: now serving serving_index {after} (was {before})")
        return EXIT_OK
    # A new candidate goes through the serving_index asset itself: the same gate (which `force`
    # overrides on the record), lineage in the UI.
    from encoder_pipeline.definitions import defs

    store = ArtifactStoreResource().store()  # the root rollback and gc act on, read now
    instance = _instance()
    sync_domain_partitions(instance)
    result = defs.resolve_job_def("train_encoder_job").execute_in_process(
        instance=instance, partition_key=args.domain, asset_selection=[dg.AssetKey("serving_index")],
        run_config={"resources": {"artifacts": {"config": {"root": str(store.root)}}},
                    "ops": {"serving_index": {"config": {"force": args.force}}}},
        raise_on_error=False)
    if not result.success:
        errors = [e.step_failure_data.error for e in result.get_step_failure_events()]
        # a dg.Failure carries its reason; any other exception is wrapped, its reason in `cause`
        reasons = [(error.cause or error).message.strip() for error in errors if error]
        print(f"not promoted (run {result.run_id}): {'; '.join(reasons) or 'see the run in the UI'}",
              file=sys.stderr)
        return EXIT_REFUSED
    event = next(e for e in result.get_asset_materialization_events())
    metadata = event.materialization.metadata
    forced = (f", FORCED over its report's refusal ({metadata['reason'].value})"
              if metadata["forced"].value else "")
    print(f"{args.domain}: promoted embedding_index {metadata['promoted_version'].value}{forced} "
          f"(previously served: {metadata['previous_version'].value}); "
          f"{metadata['gc_deleted_versions'].value} old versions collected")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from encoder_pipeline.lib.promotion import garbage_collect
    from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

    store = ArtifactStoreResource().store()
    if not store.domain_dir(args.domain).is_dir():
        print(f"error: no artifacts for domain '{args.domain}' under {store.root}", file=sys.stderr)
        return EXIT_BAD_INPUT
    keep = args.keep if args.keep is not None else PipelineSettings().keep_promoted_versions
    if keep < 1:
        print("error: --keep must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = garbage_collect(store, args.domain, keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for asset, version in result.deleted:
        print(f"{verb} {asset}/{version}")
    print(f"{args.domain}: {verb} {len(result.deleted)} versions ({result.freed_bytes / 1e6:.1f} MB), "
          f"kept {result.kept} (the last {keep} promotions, what they need, every LATEST)")
    return EXIT_OK


def submit_backfill(instance, domains: list[str], run_config: dict, title: str):
    """Add a job backfill of train_encoder_job over these domain partitions to the instance, the
    same record the UI's "Launch backfill" creates; the daemon (`dagster dev` runs one) launches one
    run per partition. Dagster has no public API for this, hence the internal imports (1.13)."""
    import time

    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.remote_origin import RemotePartitionSetOrigin, RemoteRepositoryOrigin
    from dagster._core.remote_representation.external_data import partition_set_snap_name_for_job_name
    from dagster._core.utils import make_new_backfill_id
    from dagster._core.workspace.load_target import PyProjectFileTarget

    from encoder_pipeline.definitions import defs

    job = defs.resolve_job_def("train_encoder_job")
    # The code location as `dagster dev` loads it from pyproject.toml: the daemon finds it by name.
    [location] = PyProjectFileTarget(str(project_root() / "pyproject.toml")).create_origins()
    backfill = PartitionBackfill(
        backfill_id=make_new_backfill_id(),
        partition_set_origin=RemotePartitionSetOrigin(
            repository_origin=RemoteRepositoryOrigin(location, defs.get_repository_def().name),
            partition_set_name=partition_set_snap_name_for_job_name(job.name)),
        status=BulkActionStatus.REQUESTED,
        partition_names=domains,
        from_failure=False,
        tags={"encoder_pipeline/reason": "encoder-pipeline backfill"},
        backfill_timestamp=time.time(),
        title=title,
        run_config=run_config,
    )
    instance.add_backfill(backfill)
    return backfill


def cmd_backfill(args: argparse.Namespace) -> int:
    from encoder_pipeline.domains import SpecError, domain_names, load_domain

    known = domain_names()
    wanted = known if args.domains == "all" else list(dict.fromkeys(
        name.strip() for name in args.domains.split(",") if name.strip()))
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        print(f"error: unknown domain(s) {', '.join(unknown) or '(none given)'}; known: "
              f"{', '.join(known)} (or `all`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        for name in wanted:
            load_domain(name)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    instance = _instance()
    sync_domain_partitions(instance)
    run_config = ({"resources": {"settings": {"config": {"profile": args.profile}}}}
                  if args.profile else {})
    backfill = submit_backfill(instance, wanted, run_config, title=f"encoder-pipeline backfill "
                                                                   f"{','.join(wanted)}")
    print(f"backfill {backfill.backfill_id}: train_encoder_job over {', '.join(wanted)}"
          f"{f' (profile {args.profile})' if args.profile else ''}")
    print(f"the Dagster daemon launches its runs: `DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev "
          f"-h 127.0.0.1` from {project_root()} runs one; watch it at "
          f"http://127.0.0.1:3000/runs/b/{backfill.backfill_id}")
    return EXIT_OK


def cmd_judge(args: argparse.Namespace) -> int:
    import secrets
    import webbrowser

    from encoder_pipeline.domains import SpecError, load_domain
    from encoder_pipeline.judge_page import bind, create_app, open_session, serve
    from encoder_pipeline.lib.judging import JudgingError, judged_set_summary
    from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        spec = load_domain(args.domain)
        session = open_session(spec, ArtifactStoreResource().store(), PipelineSettings(),
                               queries_file=args.queries and os.path.abspath(args.queries),
                               folder=args.folder and os.path.abspath(args.folder), depth=args.depth,
                               target=args.target, say=say)
    except (SpecError, JudgingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sock = bind(args.port)
    except OSError as error:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {error.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    token = secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/?token={token}"
    say(f"judging {spec.name} at {url}")
    say(f"judgments go to {session.folder}; Ctrl-C stops (each judgment is on disk as soon as it is made)")
    if not args.no_browser:
        webbrowser.open(url)
    before = judged_set_summary(session.folder)
    serve(create_app(session, token, spec.name, spec.queries.relevance), sock)
    say(f"stopped: {session.state()['judged_queries']} of {args.target} queries judged, in {session.folder}")
    if judged_set_summary(session.folder) != before:
        _record_judged_set(spec.name)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encoder-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialize the whole graph for one domain")
    run.add_argument("--domain", default="code")
    run.add_argument("--profile", choices=list(PROFILES),
                     default=os.environ.get("ENCODER_PIPELINE_PROFILE", "default"))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--verbose", action="store_true", help="Dagster's full event stream instead of "
                     "one line per stage")
    run.set_defaults(handler=cmd_materialize)
    domains = commands.add_parser("domains", help="validate spec files and register partitions")
    domains.set_defaults(handler=cmd_domains)
    domain = commands.add_parser("domain", help="manage domains").add_subparsers(dest="action",
                                                                                  required=True)
    add = domain.add_parser("add", help="write, validate and register a spec for your corpus")
    add.add_argument("name", help="lowercase letters, digits and _")
    add.add_argument("--corpus", required=True, help="BEIR folder, folder of files, file or glob, or URI")
    add.add_argument("--judged", help="BEIR folder with queries.jsonl and qrels/dev.tsv (evaluated on)")
    add.add_argument("--format", choices=[key for key, f in FORMATS.items() if f.uses_location],
                     help="default: detected from the path")
    add.add_argument("--id-field", help="the id column (default: the first of _id, id, doc_id the "
                     "corpus has; else ids are content hashes)")
    add.add_argument("--title-field", default="title")
    add.add_argument("--text-field", help="the text column (default: the first of text, body, content, "
                     "contents, code, passage, document the corpus has; else its one column besides "
                     "the id and title)")
    add.add_argument("--description", default="")
    add.add_argument("--on-malformed", choices=["fail", "skip"], default="fail",
                     help="malformed entries (a bad JSONL line, a non-UTF-8 file): refuse the corpus "
                     "(default) or leave them out, counted")
    add.add_argument("--force", action="store_true", help="replace an existing spec")
    add.set_defaults(handler=cmd_domain_add)
    search = commands.add_parser("search", help="search a domain's served index")
    search.add_argument("--domain", default="code")
    search.add_argument("query", nargs="+", help="the query (several words are joined)")
    search.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--backend", choices=["torch", "onnx-int8"], default="torch",
                        help="query encoder runtime (onnx-int8 needs the `onnx` extra)")
    search.set_defaults(handler=cmd_search)
    export = commands.add_parser("export", help="export the served encoder with a model card")
    export.add_argument("--domain", default="code")
    export.add_argument("--out", required=True, help="the folder to write (a sentence-transformers model)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.set_defaults(handler=cmd_export)
    rollback = commands.add_parser("rollback", help="serve the previously promoted index again")
    rollback.add_argument("--domain", required=True)
    rollback.set_defaults(handler=cmd_rollback)
    promote = commands.add_parser("promote", help="promote the latest candidate (if the report says "
                                                  "it is safe), or serve an earlier promoted version")
    promote.add_argument("--domain", required=True)
    promote.add_argument("--version", help="an earlier serving_index version to serve again (an "
                                           "unknown one is refused with the list of promoted versions)")
    promote.add_argument("--force", action="store_true",
                         help="promote the latest candidate even though its eval_report refused it "
                              "(recorded as forced in its promotion.json and in the UI)")
    promote.set_defaults(handler=cmd_promote)
    gc = commands.add_parser("gc", help="delete artifacts older than the last N promoted versions")
    gc.add_argument("--domain", required=True)
    gc.add_argument("--keep", type=int, help="promoted versions to keep (default: the "
                                             "keep_promoted_versions setting, 3)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    gc.set_defaults(handler=cmd_gc)
    backfill = commands.add_parser("backfill", help="launch a Dagster backfill of train_encoder_job")
    backfill.add_argument("--domains", required=True, help="`all` or a comma-separated list")
    backfill.add_argument("--profile", choices=list(PROFILES),
                          help="size profile of every run (default: the code location's)")
    backfill.set_defaults(handler=cmd_backfill)
    judge = commands.add_parser("judge", help="label relevance in a local page: your own judged set")
    judge.add_argument("--domain", required=True)
    judge.add_argument("--queries", help="your real queries: one per line, or JSONL with a `text` or "
                                         "`query` field (default: the domain's held-out eval queries)")
    judge.add_argument("--folder", help="where the judgments go (default: the domain's `judged` folder "
                                        "in the artifact root); the spec's [judged] points at it")
    judge.add_argument("--depth", type=int, default=10, help="each system's top-k pooled (default 10)")
    judge.add_argument("--target", type=int, default=200, help="queries to judge (default 200)")
    judge.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    judge.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    judge.set_defaults(handler=cmd_judge)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
