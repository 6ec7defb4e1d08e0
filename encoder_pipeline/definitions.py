"""The code location: every stage's assets and checks under `defs/`, the domain automation, the
resources they share, and the executor chosen by ENCODER_PIPELINE_EXECUTOR."""

import os

import dagster as dg

from encoder_pipeline import defs as stages
from encoder_pipeline.defs.domains.sensors import (
    corpus_drift_sensor,
    domain_specs_sensor,
    index_refresh_job,
    train_encoder_job,
    weekly_retrain_schedule,
)
from encoder_pipeline.executors import executor_from_env
from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings


def llm_resource() -> LLMResource:
    """Local offline model by default; ENCODER_PIPELINE_LLM_BACKEND=openai selects an endpoint, whose
    key is read from ENCODER_PIPELINE_LLM_API_KEY at run time (never stored)."""
    if os.environ.get("ENCODER_PIPELINE_LLM_BACKEND", "local") == "openai":
        return LLMResource(
            backend="openai",
            base_url=os.environ.get("ENCODER_PIPELINE_LLM_BASE_URL") or None,
            model=os.environ.get("ENCODER_PIPELINE_LLM_MODEL", "gpt-4o-mini"),
            api_key=dg.EnvVar("ENCODER_PIPELINE_LLM_API_KEY"),
        )
    return LLMResource()


# Evaluates the assets' automation conditions (a new clean_corpus flows to the index, the report and,
# when its blocking checks pass, serving). Declaring it keeps Dagster from adding its default one,
# which would be on; this one is off until turned on in the UI.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_condition_sensor", target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED, minimum_interval_seconds=60,
)


defs = dg.Definitions(
    assets=dg.load_assets_from_package_module(stages, include_specs=True),
    asset_checks=dg.load_asset_checks_from_package_module(stages),
    jobs=[train_encoder_job, index_refresh_job],
    sensors=[domain_specs_sensor, corpus_drift_sensor, automation_sensor],
    schedules=[weekly_retrain_schedule],
    # Steps of a run: local processes (capped), Kubernetes Jobs or Celery workers (executors.py).
    executor=executor_from_env(),
    resources={
        "artifacts": ArtifactStoreResource(),
        "settings": PipelineSettings(profile=os.environ.get("ENCODER_PIPELINE_PROFILE", "default")),
        "llm": llm_resource(),
    },
)
