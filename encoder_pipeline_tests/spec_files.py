"""Spec files for tests: a minimal valid domain spec, written where a test wants it."""

import textwrap

MINIMAL = """
name = "{name}"
[corpus]
format = "jsonl"
path = "{path}"
[unit]
name = "paragraph"
[queries]
form = "a question"
relevance = "it answers it"
hard_negative = "same topic, other answer"
pair_extractor = "title"
[targets]
ndcg_at_10 = 0.5
p95_latency_ms = 20
index_mb = 10
usd_per_1k_queries = 0.01
"""


def write_spec(directory, name="mine", path="docs/*.jsonl", extra=""):
    spec = directory / f"{name}.toml"
    spec.write_text(MINIMAL.format(name=name, path=path) + textwrap.dedent(extra))
    return spec
