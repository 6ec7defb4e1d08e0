"""The code location: every stage's assets and checks under `defs/`, the domain automation, and the
resources they share."""

import os

import dagster as dg

from encoder_pipeline import defs as stages
from encoder_pipeline.defs.domains.sensors import (
    corpus_change_sensor,
    domain_specs_sensor,
    train_encoder_job,
    weekly_retrain_schedule,
)
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


defs = dg.Definitions(
    assets=dg.load_assets_from_package_module(stages),
    asset_checks=dg.load_asset_checks_from_package_module(stages),
    jobs=[train_encoder_job],
    sensors=[domain_specs_sensor, corpus_change_sensor],
    schedules=[weekly_retrain_schedule],
    resources={
        "artifacts": ArtifactStoreResource(),
        "settings": PipelineSettings(profile=os.environ.get("ENCODER_PIPELINE_PROFILE", "default")),
        "llm": llm_resource(),
    },
)
