"""synthetic_queries against a real OpenAI-compatible HTTP server on 127.0.0.1: the domain must opt
in before documents leave the machine, the LLM judges relabeling, and the key is never written."""

import re

import dagster as dg
import pytest
from fake_llm import FAKE_KEY, FakeOpenAIServer, serving

from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.llm import openai_compatible
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets, tiny_code_spec

UPSTREAM = ["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries"]


def answer(prompt: str) -> str:
    """A judge picks candidate 1; a generator names the function of the last passage it was shown."""
    if "Which passage is most relevant" in prompt:
        return "1"
    title = re.findall(r"Passage: ([\w.]+)", prompt)[-1]
    return f"what does {title.replace('.', ' ').replace('_', ' ')} do"


@pytest.fixture
def server(monkeypatch):
    """The fake endpoint, counted as remote (it listens on 127.0.0.1, which would count as this
    machine): the opt-in and the `sent_to_llm` record are what is under test."""
    monkeypatch.setattr(openai_compatible, "on_this_machine", lambda base_url: False)
    srv = FakeOpenAIServer()
    srv.respond = answer
    with serving(srv):
        yield srv


def run(tmp_path, server, allow_remote: bool):
    domains = tmp_path / "domains"
    domains.mkdir(exist_ok=True)
    (domains / "code.toml").write_text(tiny_code_spec().replace(
        "remote_llm_allowed = false", f"remote_llm_allowed = {str(allow_remote).lower()}"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    return dg.materialize(graph_assets(), selection=UPSTREAM, instance=instance,
                          partition_key="code", raise_on_error=False,
                          resources={
                              PUBLISHED: published_artifacts,
                              "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
                              "settings": PipelineSettings(profile="tiny"),
                              "llm": LLMResource(backend="openai", base_url=server.base_url,
                                                 model="fake-model", api_key=FAKE_KEY,
                                                 usd_per_1m_prompt_tokens=1.0),
                          })


@pytest.mark.slow
def test_remote_llm_needs_the_domain_to_opt_in(tmp_path, server, monkeypatch):
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    result = run(tmp_path, server, allow_remote=False)
    assert not result.success
    failure = next(e for e in result.get_step_failure_events() if e.step_key == "synthetic_queries")
    assert "remote_llm_allowed = true" in failure.step_failure_data.error.message
    assert server.requests == 0


@pytest.mark.slow
def test_remote_generation_with_llm_judge(tmp_path, server, monkeypatch):
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    result = run(tmp_path, server, allow_remote=True)
    assert result.success
    metadata = next(e for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "synthetic_queries").materialization.metadata
    assert metadata["queries_kept"].value > 0
    assert metadata["prompt_tokens"].value > 0 and metadata["estimated_usd"].value > 0
    assert server.base_url in metadata["sent_to_llm"].value
    prompts = server.requests
    assert prompts > metadata["queries_prompts"].value, "judge prompts were sent after generation"
    written = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert written and not any(FAKE_KEY.encode() in p.read_bytes() for p in written)
    assert all(FAKE_KEY not in str(v.value) for v in metadata.values())
