"""The spec sensor registers partitions; the drift sensor observes corpora (its decisions are in
test_drift.py) and, with the weekly schedule, requests retrains; the retrain triggers and the
automation-condition sensor are off by default."""

import datetime
import json

import dagster as dg
import pytest
from spec_files import write_spec

from encoder_pipeline.definitions import defs
from encoder_pipeline.defs.automation.sensors import (
    corpus_drift_sensor,
    domain_specs_sensor,
    weekly_retrain_schedule,
)
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings, published_artifacts


@pytest.fixture
def domains(tmp_path, monkeypatch):
    directory = tmp_path / "domains"
    directory.mkdir()
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(directory))
    return directory


def test_new_spec_file_becomes_a_partition(domains, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    assert isinstance(domain_specs_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
    write_spec(domains, name="notes", path=tmp_path / "notes.jsonl")
    result = domain_specs_sensor(dg.build_sensor_context(instance=instance))
    request = result.dynamic_partitions_requests[0]
    assert request.partitions_def_name == domain_partitions.name and request.partition_keys == ["notes"]
    instance.add_dynamic_partitions(domain_partitions.name, ["notes"])
    assert isinstance(domain_specs_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)


def test_partitions_follow_the_spec_files_invalid_ones_never_registered(domains, tmp_path):
    """An invalid spec gets no partition (the sensor says why); a spec file that is deleted loses
    its partition."""
    instance = dg.DagsterInstance.ephemeral()
    write_spec(domains, name="notes", path=tmp_path / "notes.jsonl")
    (domains / "broken.toml").write_text((domains / "notes.toml").read_text().replace("[corpus]", "[corpus]\nbogus = 1"))
    result = domain_specs_sensor(dg.build_sensor_context(instance=instance))
    [request] = result.dynamic_partitions_requests
    assert request.partition_keys == ["notes"]
    instance.add_dynamic_partitions(domain_partitions.name, ["notes"])
    skip = domain_specs_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(skip, dg.SkipReason) and "invalid, not registered: broken" in skip.skip_message
    (domains / "notes.toml").unlink()
    [delete] = domain_specs_sensor(dg.build_sensor_context(instance=instance)).dynamic_partitions_requests
    assert isinstance(delete, dg.DeleteDynamicPartitionsRequest) and delete.partition_keys == ["notes"]


def test_a_domain_never_built_is_observed_not_retrained(domains, tmp_path):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text('{"_id": "1", "title": "a", "text": "first version"}\n')
    write_spec(domains, name="notes", path=corpus)
    write_spec(domains, name="elsewhere", path=tmp_path / "missing.jsonl")  # no corpus: not observable
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["notes", "elsewhere"])
    resources = {PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
                 "settings": PipelineSettings(profile="tiny")}

    first = corpus_drift_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    [event] = first.asset_events
    assert first.run_requests == [] and event.partition == "notes"
    assert event.metadata["decision"].value == "none"
    assert "no training snapshot" in event.metadata["reason"].value
    assert set(json.loads(first.cursor)) == {"notes"}
    corpus.write_text('{"_id": "1", "title": "a", "text": "second, longer version"}\n')
    changed = corpus_drift_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor,
                                                          resources=resources))
    assert changed.run_requests == [] and len(changed.asset_events) == 1


def test_weekly_schedule_requests_every_domain(tmp_path):
    # A schedule context needs an instance with a ref (an ephemeral one has none).
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path))
    instance.add_dynamic_partitions(domain_partitions.name, ["code", "legal"])
    context = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime.datetime(2026, 11, 23, 3, 0))
    requests = weekly_retrain_schedule(context)
    assert [r.partition_key for r in requests] == ["code", "legal"]
    assert all(r.run_key.endswith("2026-W48") for r in requests)


def test_retrain_triggers_are_off_by_default():
    assert corpus_drift_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert weekly_retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert domain_specs_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    # Declaring the automation-condition sensor keeps Dagster from adding its default one, which is on.
    [automation] = [s for s in defs.sensors if isinstance(s, dg.AutomationConditionSensorDefinition)]
    assert automation.default_status == dg.DefaultSensorStatus.STOPPED
