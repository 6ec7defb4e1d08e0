"""The spec sensor registers partitions; the corpus-change sensor and the weekly schedule request
retrains; both retrain triggers are off by default."""

import datetime
import json

import dagster as dg
import pytest
from spec_files import write_spec

from encoder_pipeline.defs.domains.sensors import (
    corpus_change_sensor,
    domain_specs_sensor,
    weekly_retrain_schedule,
)
from encoder_pipeline.domains import domain_partitions


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


def test_corpus_change_requests_one_retrain(domains, tmp_path):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text('{"_id": "1", "title": "a", "text": "first version"}\n')
    write_spec(domains, name="notes", path=corpus)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["notes"])

    first = corpus_change_sensor(dg.build_sensor_context(instance=instance))
    assert first.run_requests == [] and "notes" in json.loads(first.cursor)
    unchanged = corpus_change_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert isinstance(unchanged, dg.SkipReason)

    corpus.write_text('{"_id": "1", "title": "a", "text": "second, longer version"}\n')
    changed = corpus_change_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    [request] = changed.run_requests
    assert request.partition_key == "notes"
    assert request.run_key.startswith("notes:")
    assert "corpus changed" in request.tags["encoder_pipeline/reason"]
    again = corpus_change_sensor(dg.build_sensor_context(instance=instance, cursor=changed.cursor))
    assert isinstance(again, dg.SkipReason)


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
    assert corpus_change_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert weekly_retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert domain_specs_sensor.default_status == dg.DefaultSensorStatus.RUNNING
