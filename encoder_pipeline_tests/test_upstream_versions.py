"""Lineage from what was read: an asset's manifest records the upstream versions it actually read,
even when another run publishes a newer one before it finishes, and the assets it read without
listing them."""

from types import SimpleNamespace

import dagster as dg

from encoder_pipeline.defs.shared import publish
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest, start_reading
from encoder_pipeline.lib.layout import latest
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

DOMAIN = "demo"


def _put(store: ArtifactStore, asset: str, version: str) -> None:
    with store.publish(Manifest(DOMAIN, asset, version, 0, {}, corpus_fingerprint="f")):
        pass


def test_the_manifest_records_the_versions_read_not_the_latest_at_publish(tmp_path):
    store = ArtifactStore(tmp_path)
    for asset, version in (("clean_corpus", "c1"), ("eval_set", "e1"), ("synthetic_queries", "s1"),
                           ("heuristic_pairs", "p0")):
        _put(store, asset, version)
    start_reading()  # as the asset starts (defs.shared.domain_spec)
    store.latest(DOMAIN, "clean_corpus")  # reads c1 ...
    store.latest(DOMAIN, "synthetic_queries")  # ... and an asset it does not list
    store.latest(DOMAIN, "heuristic_pairs")  # its own previous version: not an upstream
    _put(store, "serving_index", "s1")
    store.latest_version(DOMAIN, "serving_index", lineage=False)  # measured against (lib.search), not built from
    _put(store, "clean_corpus", "c2")  # another run publishes meanwhile
    context = SimpleNamespace(partition_key=DOMAIN, asset_key=dg.AssetKey("heuristic_pairs"),
                              run=SimpleNamespace(run_id="run12345-rest"))
    with publish(context, ArtifactStoreResource(root=str(tmp_path)), PipelineSettings(profile="tiny"), {},
                 ["clean_corpus", "eval_set"]):
        pass
    manifest = store.manifest(DOMAIN, "heuristic_pairs")
    assert manifest["version"] == "run12345"
    assert manifest["upstream"] == {"clean_corpus": "c1", "eval_set": "e1", "synthetic_queries": "s1"}


def test_the_handles_an_asset_received_are_its_upstream_at_their_versions(tmp_path):
    """`ins=` handles are loaded before the asset starts its ledger: publish records their versions,
    not the latest by then."""
    store = ArtifactStore(tmp_path)
    for asset, version in (("clean_corpus", "c1"), ("eval_set", "e1")):
        _put(store, asset, version)
    received = [latest(store, DOMAIN, "clean_corpus"), latest(store, DOMAIN, "eval_set")]  # the input manager
    start_reading()  # then the asset starts
    _put(store, "eval_set", "e2")  # another run publishes meanwhile
    context = SimpleNamespace(partition_key=DOMAIN, asset_key=dg.AssetKey("heuristic_pairs"),
                              run=SimpleNamespace(run_id="run67890-rest"))
    with publish(context, ArtifactStoreResource(root=str(tmp_path)), PipelineSettings(profile="tiny"), {},
                 received):
        pass
    manifest = store.manifest(DOMAIN, "heuristic_pairs")
    assert manifest["upstream"] == {"clean_corpus": "c1", "eval_set": "e1"}
    assert manifest["corpus_fingerprint"] == "f"  # from the corpus version received
