"""The code location: every stage's assets (and the checks declared on them) under `defs/`, one
folder per asset group in stage order, the domain automation, the resources they share, and the
executor chosen by ENCODER_PIPELINE_EXECUTOR."""

import os

import dagster as dg

from encoder_pipeline.defs.automation import health
from encoder_pipeline.defs.automation.sensors import (
    corpus_drift_sensor,
    domain_specs_sensor,
    index_refresh_job,
    train_encoder_job,
    weekly_retrain_schedule,
)
from encoder_pipeline.defs.corpus import assets as corpus_assets
from encoder_pipeline.defs.corpus import drift as corpus_drift
from encoder_pipeline.defs.evaluation import assets as evaluation_assets
from encoder_pipeline.defs.indexing import assets as indexing_assets
from encoder_pipeline.defs.serving import assets as serving_assets
from encoder_pipeline.defs.training import assets as training_assets
from encoder_pipeline.defs.training_data import assets as training_data_assets
from encoder_pipeline.executors import executor_from_env
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)


def llm_resource() -> LLMResource:
    """The local offline model by default; ENCODER_PIPELINE_LLM_BACKEND names another registered
    backend (`openai`: any OpenAI-compatible endpoint), with its base URL and model. The key, when
    ENCODER_PIPELINE_LLM_API_KEY is set, is read at run time (never stored); a server on this
    machine needs none."""
    backend = os.environ.get("ENCODER_PIPELINE_LLM_BACKEND", "local")
    if backend == "local":
        return LLMResource()
    return LLMResource(
        backend=backend,
        base_url=os.environ.get("ENCODER_PIPELINE_LLM_BASE_URL") or None,
        model=os.environ.get("ENCODER_PIPELINE_LLM_MODEL", "gpt-4o-mini"),
        api_key=dg.EnvVar("ENCODER_PIPELINE_LLM_API_KEY") if "ENCODER_PIPELINE_LLM_API_KEY" in os.environ
        else None,
    )


# Evaluates the assets' automation conditions (a new clean_corpus flows to the index, the report and,
# when its blocking checks pass, serving). Declaring it keeps Dagster from adding its default one,
# which would be on; this one is off until turned on in the UI.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_condition_sensor", target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED, minimum_interval_seconds=60,
)


# One module list, in stage order: each folder of defs/ is one asset group (corpus, training_data,
# training, indexing, evaluation, serving; automation: domain_health over them all); checks are
# declared on their assets.
STAGES = [corpus_drift, corpus_assets, training_data_assets, training_assets, indexing_assets,
          evaluation_assets, serving_assets, health]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES, include_specs=True),
    jobs=[train_encoder_job, index_refresh_job, health.domain_health_job],
    sensors=[domain_specs_sensor, corpus_drift_sensor, automation_sensor, *health.health_sensors],
    schedules=[weekly_retrain_schedule],
    # Steps of a run: local processes (capped), Kubernetes Jobs or Celery workers (executors.py).
    executor=executor_from_env(),
    resources={
        PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(),
        "settings": PipelineSettings(profile=os.environ.get("ENCODER_PIPELINE_PROFILE", "default")),
        "llm": llm_resource(),
    },
)
