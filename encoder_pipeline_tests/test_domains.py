"""Domain specs: the built-ins load, and bad spec files fail with the file and the field named."""


import dagster as dg
import pytest
from spec_files import write_spec

from encoder_pipeline.domains import SpecError, domain_names, load_domain, load_spec
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
from encoder_pipeline.lib.sources import CorpusError, read_corpus
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


def test_the_run_teacher_overrides_the_domain_teacher_which_overrides_the_base_model(tmp_path):
    plain = load_spec(write_spec(tmp_path)).training
    assert (plain.teacher_model, plain.distill_weight) == ("", 0.0)
    spec = load_spec(write_spec(tmp_path, extra="""
        [training]
        teacher_model = "all-mpnet-base-v2"
        distill_weight = 1.0
    """)).training
    assert PipelineSettings().mining_teacher(plain.teacher_model) == DEFAULT_BASE_MODEL
    assert PipelineSettings().mining_teacher(spec.teacher_model) == "all-mpnet-base-v2"
    assert PipelineSettings(teacher_model="/models/mine").mining_teacher(spec.teacher_model) == "/models/mine"
    with pytest.raises(SpecError, match=r"training\.distill_weight"):
        load_spec(write_spec(tmp_path, extra="""
            [training]
            distill_weight = -1
        """))


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
    from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

    monkeypatch.setenv("ENCODER_PIPELINE_CORPUS_ROOT", str(tmp_path / "absent"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["web_qa"])
    clean = next(a for a in defs.assets if a.key == dg.AssetKey("clean_corpus"))
    result = dg.materialize([clean], instance=instance, partition_key="web_qa", raise_on_error=False,
                            resources={"artifacts": ArtifactStoreResource(root=str(tmp_path / "a")),
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
