"""`encoder-pipeline`: run the main job for a domain, list domains, search a served index.

    encoder-pipeline materialize --domain code            # the whole graph for one partition
    encoder-pipeline materialize --domain code --profile tiny
    encoder-pipeline domains                              # validate specs, register partitions

Runs go through the project's Dagster instance (DAGSTER_HOME defaults to the project root), so
they show in the UI with their lineage and metadata.
"""

import argparse
import os
import sys

from encoder_pipeline.paths import ensure_dagster_home, project_root


def _instance():
    import dagster as dg

    ensure_dagster_home()
    os.chdir(project_root())  # dagster.yaml's storage paths are relative to the project root
    return dg.DagsterInstance.get()


def register_domains(instance) -> list[str]:
    """Add a `domain` partition for every spec file (what the spec sensor does on each tick)."""
    from encoder_pipeline.domains import domain_names, domain_partitions

    existing = set(instance.get_dynamic_partitions(domain_partitions.name))
    new = [name for name in domain_names() if name not in existing]
    if new:
        instance.add_dynamic_partitions(domain_partitions.name, new)
    return new


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
        where = "(python stdlib)" if spec.corpus.format == "python_stdlib" else spec.corpus_location()
        present = spec.corpus.format == "python_stdlib" or "://" in where or os.path.exists(where)
        status = "ok" if present else "corpus missing (set ENCODER_PIPELINE_CORPUS_ROOT)"
        print(f"{name:12s} {spec.corpus.format:14s} {where}  [{status}]")
    added = register_domains(_instance())
    if added:
        print(f"registered partitions: {', '.join(added)}")
    return 1 if failures else 0


def cmd_materialize(args: argparse.Namespace) -> int:
    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import SpecError, load_domain

    try:
        load_domain(args.domain)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    instance = _instance()
    register_domains(instance)
    job = defs.resolve_job_def("train_encoder_job")
    run_config = {"resources": {"settings": {"config": {"profile": args.profile, "seed": args.seed}}}}
    result = job.execute_in_process(instance=instance, partition_key=args.domain,
                                    run_config=run_config, raise_on_error=False)
    print(f"run {result.run_id}: {'success' if result.success else 'FAILED'}")
    if result.success:
        from encoder_pipeline.defs.evaluation.assets import read_report
        from encoder_pipeline.resources import ArtifactStoreResource

        store = ArtifactStoreResource().store()
        report_dir = store.latest(args.domain, "eval_report")
        print((report_dir / "report.md").read_text())
        print(f"report: {report_dir}")
        print(f"verdict: {read_report(store, args.domain)['verdict']}")
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encoder-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialize the whole graph for one domain")
    run.add_argument("--domain", default="code")
    run.add_argument("--profile", choices=["tiny", "default", "full"],
                     default=os.environ.get("ENCODER_PIPELINE_PROFILE", "default"))
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(handler=cmd_materialize)
    domains = commands.add_parser("domains", help="validate spec files and register partitions")
    domains.set_defaults(handler=cmd_domains)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
