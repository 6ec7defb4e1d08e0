"""Training: the cached loss's gradients equal the uncached ones (with Matryoshka, GOR and the
teacher's in-batch distillation), a tiny real run lowers the loss and writes a loadable checkpoint, and an interrupted run
resumes where it stopped."""

import random

import numpy as np
import pandas as pd
import pytest
import torch
from sentence_transformers import losses
from sentence_transformers.base.losses.merged_forward import embed_columns
from transformers import TrainerCallback

from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.extractors import ExtractorConfig
from encoder_pipeline.lib.losses import MNRLWithGOR, _gor, contrastive_loss, distillation_term, gor_term
from encoder_pipeline.lib.pairs import extract_training_pairs
from encoder_pipeline.lib.train import (
    MERGE_P,
    TEACHER_COLUMN,
    DevSet,
    TrainingConfig,
    TrainingDataError,
    auto_batch_size,
    choose_merge,
    interpolate_with_base,
    lexical_distractors,
    order_dimensions_by_variance,
    pick_merge,
    pick_rung,
    train_encoder,
    with_teacher_embeddings,
)

QUERIES = ["how to parse a date", "read a csv file", "open a network socket", "sort a list in place",
           "compress bytes", "format a float", "join two paths", "start a child process"]
POSITIVES = ["datetime.strptime parses a string into a datetime", "csv.reader iterates over rows",
             "socket.socket creates an endpoint", "list.sort sorts in place and returns None",
             "zlib.compress returns compressed bytes", "format(x, '.2f') renders a float",
             "os.path.join joins path components", "subprocess.run starts a child process"]
NEGATIVES = ["time.sleep pauses the thread", "json.loads parses JSON text", "random.shuffle shuffles",
             "math.floor rounds down", "re.compile compiles a pattern", "shutil.copy copies a file",
             "glob.glob finds paths", "threading.Thread runs code concurrently"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These batches are tiny: a second intra-op thread only adds synchronization, and on a busy
    2-core machine it can make a step 10x slower. Restored for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(stdlib_units):
    return extract_training_pairs(stdlib_units, ["docstring"], ExtractorConfig()).pairs.head(96)


@pytest.fixture(scope="module")
def small_model():
    """A private MiniLM in eval mode (no dropout, so the two loss paths see the same network)."""
    model = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32, fresh=True)
    return model.eval()


def teacher_labels(texts_by_column: list[list[str]], dim: int = 24, seed: int = 7) -> torch.Tensor:
    """A stand-in teacher's embeddings of each row's texts (query, positive, negative), flattened
    per row as `train.with_teacher_embeddings` lays them out: random but fixed per text."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = sorted({t for column in texts_by_column for t in column})
    table = dict(zip(vocabulary, torch.randn(len(vocabulary), dim, generator=generator), strict=True))
    return torch.stack([torch.cat([table[column[row]] for column in texts_by_column])
                        for row in range(len(texts_by_column[0]))])



def agreeing_teacher(model) -> torch.Tensor:
    """A teacher that ranks every row's positive first (no row left out of the term), unlike the
    student: the student's embeddings with each positive pulled toward its query."""
    with torch.no_grad():
        query, positive, negative = embed_columns(model, [model.tokenize(t) for t in (QUERIES, POSITIVES, NEGATIVES)])
    return torch.cat([query, query + 0.2 * positive, negative], dim=1)


def gradients(model, loss, labels=None) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    features = [model.tokenize(texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    value = loss(features, labels)
    value.backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(value.detach()), flat


@pytest.mark.parametrize("dims, gor_weight, distill_weight",
                         [((), 0.0, 0.0), ((384, 192, 96, 48), 0.5, 0.0), ((384, 192, 96, 48), 0.5, 1.0)])
def test_cached_loss_gives_the_uncached_gradients(small_model, dims, gor_weight, distill_weight):
    labels = agreeing_teacher(small_model) if distill_weight else None
    plain_loss, plain = gradients(small_model, contrastive_loss(
        small_model, gradcache=False, matryoshka_dims=dims, gor_weight=gor_weight,
        distill_weight=distill_weight), labels)
    # 3 texts per mini-batch: each column of 8 is embedded in 3 pieces, the last one ragged
    cached_loss, cached = gradients(small_model, contrastive_loss(
        small_model, gradcache=True, mini_batch_size=3, matryoshka_dims=dims, gor_weight=gor_weight,
        distill_weight=distill_weight), labels)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.abs().max() > 0
    # Measured: relative norm of the difference ~3e-6, max abs difference ~1.5e-6 of a max 0.49
    # (float32 sums in another order, and mini-batches padded to their own widths).
    assert float((cached - plain).norm() / plain.norm()) < 1e-4
    assert float((cached - plain).abs().max()) < 1e-4 * float(plain.abs().max())


def test_gor_adds_its_weighted_term_to_sentence_transformers_mnrl(small_model):
    features = [small_model.tokenize(texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    with torch.no_grad():
        reference = losses.MultipleNegativesRankingLoss(small_model)(features, None)
        combined = MNRLWithGOR(small_model, gor_weight=0.5)(features, None)
        term = gor_term(_gor(small_model), embed_columns(small_model, features))
    assert term > 0
    assert float(combined) == pytest.approx(float(reference + 0.5 * term), rel=1e-5)


def test_distillation_adds_its_weighted_term_and_vanishes_when_student_agrees_with_teacher(small_model):
    features = [small_model.tokenize(texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    with torch.no_grad():
        embeddings = embed_columns(small_model, features)
        # A teacher that ranks every row's positive first, sharper than the student.
        teacher = torch.cat([embeddings[0], embeddings[0] + 0.2 * embeddings[1], embeddings[2]], dim=1)
        without = MNRLWithGOR(small_model, gor_weight=0.0)(features, teacher)
        combined = MNRLWithGOR(small_model, gor_weight=0.0, distill_weight=2.0)(features, teacher)
        term = distillation_term(embeddings, teacher, scale=20.0)
        # The student as its own teacher: its in-batch score matrix is the target, the term is 0.
        agreeing = distillation_term(embeddings, torch.cat(embeddings, dim=1), scale=20.0)
    assert term > 0
    assert float(combined) == pytest.approx(float(without + 2.0 * term), rel=1e-5)
    assert float(agreeing) == pytest.approx(0.0, abs=1e-5)


def test_a_teacher_that_contradicts_the_pair_adds_nothing_for_that_row(small_model):
    """The label wins: where the teacher ranks another candidate above the row's positive (here: the
    row's negative, by swapping them), that row's term is left out, not learnt."""
    features = [small_model.tokenize(texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    with torch.no_grad():
        embeddings = embed_columns(small_model, features)
        right = torch.cat([embeddings[0], embeddings[0] + 0.2 * embeddings[1], embeddings[2]], dim=1)
        wrong = torch.cat([embeddings[0], embeddings[2], embeddings[0] + 0.2 * embeddings[1]], dim=1)
        assert float(distillation_term(embeddings, wrong, scale=20.0)) == 0.0
        mixed = torch.cat([right[:4], wrong[4:]])  # the last four rows contradicted
        assert float(distillation_term(embeddings, mixed, scale=20.0)) > 0  # the first four still count


def test_distillation_scores_every_in_batch_candidate_in_mnrl_order(small_model):
    """Rows without mined negatives still get the teacher's signal: the candidates of every row are
    each query's candidates, in MultipleNegativesRankingLoss's order (all positives, then negatives)."""
    features = [small_model.tokenize(texts) for texts in (QUERIES, POSITIVES)]
    with torch.no_grad():
        embeddings = embed_columns(small_model, features)
        labels = teacher_labels([QUERIES, POSITIVES])
        teacher = torch.nn.functional.normalize(labels.reshape(len(QUERIES), 2, -1), dim=-1)
        student = 20.0 * (torch.nn.functional.normalize(embeddings[0], dim=-1)
                          @ torch.nn.functional.normalize(embeddings[1], dim=-1).T)
        target = 20.0 * teacher[:, 0] @ teacher[:, 1].T  # each query against every row's positive
        per_row = torch.nn.functional.kl_div(student.log_softmax(-1), target.log_softmax(-1),
                                             log_target=True, reduction="none").sum(-1)
        agrees = target.argmax(-1) == torch.arange(len(QUERIES))  # rows whose teacher ranks the positive first
        expected = (per_row * agrees).sum() / len(QUERIES)
        assert 0 < int(agrees.sum()) < len(QUERIES), "both kinds of rows: kept and left out"
        assert float(distillation_term(embeddings, labels, 20.0)) == pytest.approx(float(expected), rel=1e-5)


def test_auto_batch_grows_with_the_pairs_but_keeps_the_step_count():
    assert auto_batch_size(700) == 32  # the probe: small sets want small batches
    assert auto_batch_size(2000) == 32
    assert auto_batch_size(4096) == 64
    assert auto_batch_size(20_000) == 256
    assert auto_batch_size(100_000) == 1024  # capped; GradCache keeps memory flat
    assert auto_batch_size(500, min_batch=16) == 16


def mnrl_loss(model, pairs: pd.DataFrame) -> float:
    features = [model.tokenize(list(pairs["query"])), model.tokenize(list(pairs["positive"]))]
    with torch.no_grad():
        return float(losses.MultipleNegativesRankingLoss(model)(features, None))


@pytest.mark.slow
def test_training_lowers_loss_and_writes_a_loadable_model(pairs, tmp_path):
    dev = DevSet({f"q{i}": q for i, q in enumerate(pairs["query"][:20])},
                 dict(zip(pairs["doc_id"], pairs["positive"], strict=True)),
                 {f"q{i}": {d} for i, d in enumerate(pairs["doc_id"][:20])})
    base = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL)
    before, loss_before = dev.ndcg_at_10(base), mnrl_loss(base, pairs.head(32))
    result = train_encoder(encoders.DEFAULT_BASE_MODEL, pd.concat([pairs] * 2), tmp_path,
                           TrainingConfig(batch_size=16, epochs=1, learning_rate=1e-4, fine_tuned_weight=1.0),
                           dev)
    assert result.steps == 12 and result.pairs_per_second > 0 and result.best_step == 12
    assert result.loss == "Matryoshka(384/192/96/48) of MNRL + 0.1 GOR"  # batch 16 <= mini-batch
    trained = encoders.load_encoder(str(tmp_path / "model"))
    assert trained.encode(["parse a date"]).shape == (1, 384)
    assert mnrl_loss(trained, pairs.head(32)) < loss_before
    assert result.dev_ndcg_at_10 >= before, "training on these very pairs must not hurt them"
    assert result.matryoshka_dim == 96 and 0 < result.dev_ndcg_at_10_truncated <= 1
    assert encoders.model_fingerprint(str(tmp_path / "model")) != encoders.model_fingerprint(
        encoders.DEFAULT_BASE_MODEL)
    assert not (tmp_path / "checkpoints").exists(), "checkpoints are removed after success"


class SimulatedCrash(RuntimeError):
    pass


class Crash(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise SimulatedCrash(f"step {state.global_step}")


def test_an_interrupted_run_resumes_from_its_last_checkpoint(pairs, tmp_path):
    rows = pairs.head(32)
    # GradCache on (batch 8 in mini-batches of 4), a checkpoint after every step
    config = TrainingConfig(batch_size=8, mini_batch_size=4, max_seq_length=32, max_steps=4,
                            checkpoint_every_s=0)
    work = tmp_path / "work"
    with pytest.raises(SimulatedCrash):
        train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "a", config, checkpoint_dir=work,
                      callbacks=[Crash(at_step=3)])
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    result = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "b", config, checkpoint_dir=work)
    assert result.resumed_from_step == 2 and result.steps == 4
    assert "CachedMNRL(mini-batch 4)" in result.loss
    assert (tmp_path / "b" / "model" / "modules.json").exists() and not work.exists()


def test_checkpoints_of_other_inputs_are_not_resumed(pairs, tmp_path):
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=2, checkpoint_every_s=0)
    work = tmp_path / "work"
    with pytest.raises(SimulatedCrash):
        train_encoder(encoders.DEFAULT_BASE_MODEL, pairs.head(24), tmp_path / "a", config,
                      checkpoint_dir=work, callbacks=[Crash(at_step=2)])
    result = train_encoder(encoders.DEFAULT_BASE_MODEL, pairs.iloc[24:48], tmp_path / "b", config,
                           checkpoint_dir=work)
    assert result.resumed_from_step == 0 and result.steps == 2


def test_a_teacher_is_distilled_into_rows_with_and_without_negatives(pairs, tmp_path):
    rows = pairs.head(24)
    mined = rows.assign(negative_1=lambda df: df["positive"].shift(1, fill_value="None"))
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=1, matryoshka_dims=(),
                            gor_weight=0.0, order_dimensions=False)
    teacher = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32)
    embedded: list[str] = []

    def embed(texts: list[str]) -> np.ndarray:
        embedded.extend(texts)
        return encoders.encode(teacher, texts, bf16=False)

    plain = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "plain", config)
    taught = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "taught", config, teacher=embed)
    assert plain.loss == "MNRL"
    assert taught.loss == "MNRL + 0.25 KL(teacher, in-batch)"  # the default weight
    assert taught.final_loss != plain.final_loss
    assert len(embedded) == len(set(embedded)), "each distinct text is embedded once"
    assert set(embedded) == set(rows["query"]) | set(rows["positive"])
    taught_mined = train_encoder(encoders.DEFAULT_BASE_MODEL, mined, tmp_path / "mined", config, teacher=embed)
    assert taught_mined.loss == "MNRL + 0.25 KL(teacher, in-batch)"
    off = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "off",
                        TrainingConfig(**{**config.__dict__, "distill_weight": 0.0}), teacher=embed)
    assert off.loss == "MNRL"


def test_teacher_embeddings_line_up_with_each_rows_texts():
    rows = pd.DataFrame({"query": ["q1", "q2"], "positive": ["p1", "p2"], "negative_1": ["p2", "p1"]})
    vectors = {"q1": [1.0, 0.0], "q2": [0.0, 1.0], "p1": [2.0, 0.0], "p2": [0.0, 2.0]}
    out = with_teacher_embeddings(rows, ["query", "positive", "negative_1"],
                                  lambda texts: np.array([vectors[t] for t in texts]))
    assert out[TEACHER_COLUMN][0].tolist() == [1.0, 0.0, 2.0, 0.0, 0.0, 2.0]
    assert out[TEACHER_COLUMN][1].tolist() == [0.0, 1.0, 0.0, 2.0, 2.0, 0.0]


def test_too_few_pairs_is_a_clear_refusal(pairs, tmp_path):
    with pytest.raises(TrainingDataError, match="at least 16"):
        train_encoder(encoders.DEFAULT_BASE_MODEL, pairs.head(5), tmp_path, TrainingConfig())


@pytest.mark.slow
def test_variance_ordering_keeps_full_width_scores_and_sorts_dimensions(stdlib_units, tmp_path):
    from sentence_transformers import SentenceTransformer

    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, load_encoder

    texts = list(stdlib_units["title"] + "\n" + stdlib_units["text"])
    model = load_encoder(DEFAULT_BASE_MODEL, fresh=True)
    before = model.encode(texts[:40], normalize_embeddings=True)
    order_dimensions_by_variance(model, texts, sample=300, seed=0)
    model.save_pretrained(str(tmp_path / "rotated"))
    reloaded = SentenceTransformer(str(tmp_path / "rotated"), device="cpu")
    after = reloaded.encode(texts[:40], normalize_embeddings=True)
    np.testing.assert_allclose(before @ before.T, after @ after.T, atol=1e-5)  # a pure rotation
    variance = reloaded.encode(texts, normalize_embeddings=True).var(axis=0)
    assert variance[:96].sum() > 2 * variance[96:192].sum()
    assert np.all(np.diff(variance[:20]) < 1e-3)  # leading dimensions in decreasing variance


def test_interpolation_mixes_each_weight_with_the_base_model_and_leaves_added_modules_alone():
    base = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, fresh=True)
    tuned = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, fresh=True)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # stands in for a fine-tune
    order_dimensions_by_variance(tuned, POSITIVES + NEGATIVES, sample=16, seed=0)
    before = {name: tensor.clone() for name, tensor in tuned.state_dict().items()}
    base_state = base.state_dict()
    rotation = [name for name in before if name not in base_state]
    assert rotation, "the rotation's weights exist only in the tuned model"

    interpolate_with_base(tuned, base, 0.25)
    after = tuned.state_dict()
    name = "0.model.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(after[name], 0.25 * before[name] + 0.75 * base_state[name])
    for name in rotation:
        torch.testing.assert_close(after[name], before[name])
    interpolate_with_base(tuned, base, 0.0)
    np.testing.assert_allclose(  # all base weights, then the unchanged rotation: base scores
        tuned.encode(QUERIES) @ tuned.encode(POSITIVES).T, base.encode(QUERIES) @ base.encode(POSITIVES).T,
        atol=1e-5)
    with pytest.raises(ValueError, match="within"):
        interpolate_with_base(tuned, base, 1.5)
    with pytest.raises(ValueError, match="within"):  # refused before any training, not after it
        TrainingConfig(fine_tuned_weight=-0.5)


def test_training_with_weight_zero_gives_back_the_base_model(pairs, tmp_path):
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=2, learning_rate=1e-3,
                            fine_tuned_weight=0.0)
    reported = []
    train_encoder(encoders.DEFAULT_BASE_MODEL, pairs.head(16), tmp_path, config,
                  progress=lambda step, total: reported.append((step, total)))
    assert reported == [(1, 2), (2, 2)]  # progress (for the run's ETA line) every tenth and at the end
    trained = encoders.load_encoder(str(tmp_path / "model"), max_seq_length=32)
    base = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32)
    np.testing.assert_allclose(  # the rotation appended after training keeps every inner product
        trained.encode(QUERIES) @ trained.encode(POSITIVES).T, base.encode(QUERIES) @ base.encode(POSITIVES).T,
        atol=1e-4)


def test_pick_rung_serves_the_most_data_unless_a_lower_rung_beats_it_beyond_noise():
    queries = [f"q{i}" for i in range(73)]
    rng = np.random.default_rng(0)
    top = {q: float(v) for q, v in zip(queries, rng.uniform(0.4, 1.0, 73), strict=True)}

    def shifted(by: float, spread: float) -> dict[str, float]:
        return {q: v + by + float(e) for (q, v), e in zip(top.items(), rng.normal(0, spread, 73), strict=True)}

    ladder = ["encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"]
    # dev means 0.008 apart on 73 queries, as code's were: a draw, so the top rung is served
    noisy = dict(zip(ladder, [shifted(0.008, 0.1), shifted(0.004, 0.1), top], strict=True))
    assert np.mean(list(noisy["encoder_heuristic"].values())) > np.mean(list(top.values()))
    rung, why = pick_rung(noisy, kept=ladder)
    assert rung == "encoder_hard_negatives" and "beyond noise" in why and "encoder_heuristic" in why
    clearly = dict(zip(ladder, [shifted(0.1, 0.02), shifted(0.0, 0.02), top], strict=True))
    rung, why = pick_rung(clearly, kept=ladder)
    assert rung == "encoder_heuristic" and "beats encoder_hard_negatives" in why
    # a rung whose merge fell back is the base model: the highest rung that kept training is served
    rung, _ = pick_rung(noisy, kept=["encoder_heuristic", "encoder_synthetic"])
    assert rung == "encoder_synthetic"
    rung, why = pick_rung(noisy, kept=[])
    assert rung == "encoder_hard_negatives" and "each is the base model" in why


def test_pick_merge_keeps_a_merge_only_when_it_beats_the_base_beyond_noise():
    queries = [f"q{i}" for i in range(30)]
    base = {q: 0.5 for q in queries}
    clearly_better = {1.0: {q: 0.7 for q in queries}, 0.5: {q: 0.75 for q in queries}, 0.0: base}
    kept = pick_merge(clearly_better)
    assert kept["weight"] == 0.5 and kept["p_vs_base"] < MERGE_P and "beats the base model" in kept["rule"]
    rng = np.random.default_rng(0)  # +0.01 on average, spread 0.2 per query: noise
    noisy = {1.0: {q: 0.5 + d for q, d in zip(queries, rng.normal(0.01, 0.2, 30), strict=True)}, 0.0: base}
    fallback = pick_merge(noisy)
    assert fallback["weight"] == 0.0 and fallback["rule"].startswith("the base model: no merge beats it")
    # what the slice could have shown: ~1.96 * 0.2 / sqrt(30), and 4x finer with 16x the queries
    assert 0.05 < fallback["detectable_gain"] < 0.1 and f"{fallback['detectable_gain']:.3f}" in fallback["rule"]
    many = [f"q{i}" for i in range(480)]
    wide = {1.0: {q: 0.5 + d for q, d in zip(many, rng.normal(0.0, 0.2, 480), strict=True)},
            0.0: dict.fromkeys(many, 0.5)}
    assert pick_merge(wide)["detectable_gain"] == pytest.approx(fallback["detectable_gain"] / 4, rel=0.25)
    worse = {1.0: {q: 0.3 for q in queries}, 0.25: {q: 0.45 for q in queries}, 0.0: base}
    assert pick_merge(worse)["weight"] == 0.0
    tie = {1.0: {q: 0.8 for q in queries}, 0.75: {q: 0.8 for q in queries}, 0.0: base}
    assert pick_merge(tie)["weight"] == 1.0  # ties go to more fine-tuning
    with pytest.raises(ValueError, match="must include 0.0"):
        pick_merge({1.0: base})


def test_a_merge_that_cannot_beat_the_base_gives_the_base_and_leaves_the_model_alone(pairs, monkeypatch):
    """choose_merge scores every share on the dev slice for real: a 'fine-tune' that is noise loses
    to the base model, which is then chosen; the model passed in is left as it was."""
    dev = DevSet({f"q{i}": q for i, q in enumerate(pairs["query"][:24])},
                 dict(zip(pairs["doc_id"], pairs["positive"], strict=True)),
                 {f"q{i}": {d} for i, d in enumerate(pairs["doc_id"][:24])})
    base = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32)
    noise = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32, fresh=True)
    with torch.no_grad():
        for parameter in noise.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    before = {name: tensor.clone() for name, tensor in noise.state_dict().items()}
    choice, embedded = choose_merge(noise, base, dev, weights=(1.0, 0.5, 0.0))
    assert choice["weight"] == 0.0 and set(choice["dev_ndcg_at_10"]) == {"1", "0.5", "0"}
    assert choice["dev_ndcg_at_10"]["0"] == pytest.approx(dev.ndcg_at_10(base), abs=1e-3)
    assert choice["dev_ndcg_at_10"]["1"] < choice["dev_ndcg_at_10"]["0"]
    assert choice["dev_ndcg_at_10"]["0.5"] == round(float(np.mean(list(dev.scores(embedded[0.5]).values()))), 4)
    for name, tensor in noise.state_dict().items():
        torch.testing.assert_close(tensor, before[name])
    # the base model's embeddings are the same for every rung of a run: encoded once per base and
    # dev slice; the fine-tuned model's own, when handed in (the epoch's evaluation), not at all
    scored = []
    embed = DevSet.embeddings
    monkeypatch.setattr(DevSet, "embeddings",
                        lambda self, model, bf16=True: scored.append(model) or embed(self, model, bf16))
    first = choose_merge(noise, base, dev, weights=(1.0, 0.0), base_key="minilm@32")[0]
    second = choose_merge(noise, base, dev, weights=(1.0, 0.0), base_key="minilm@32")[0]
    assert [model is base for model in scored] == [False, True, False] and first == second
    smaller = DevSet(dict(list(dev.queries.items())[:12]), dev.corpus, dev.relevant)
    choose_merge(noise, base, smaller, weights=(1.0, 0.0), base_key="minilm@32")
    assert [model is base for model in scored[3:]] == [False, True]  # another dev slice: encoded again
    handed = choose_merge(noise, base, dev, weights=(1.0, 0.0), base_key="minilm@32", tuned=embedded[1.0])[0]
    assert len(scored) == 5 and handed == first


def test_the_merge_search_reuses_the_epochs_dev_pass_and_reports_what_the_saved_model_scores(pairs, tmp_path,
                                                                                          monkeypatch):
    """One epoch, three shares: the dev slice goes through a model twice (the epoch's evaluation and
    share 0.5), not six times: share 1.0 is the epoch's pass, the base model's embeddings are handed
    in (as from an embedding cache), the variance ordering reuses the kept share's, and the kept
    model's final scores are its share's embeddings rotated, which must be what the saved model gives."""
    from collections import Counter

    from encoder_pipeline.lib import train

    dev = DevSet({f"m{i}": q for i, q in enumerate(pairs["query"][40:56])},
                 dict(zip(pairs["doc_id"][32:], pairs["positive"][32:], strict=True)),
                 {f"m{i}": {d} for i, d in enumerate(pairs["doc_id"][40:56])})
    base = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL, max_seq_length=32)
    base_dev = dev.embeddings(base, bf16=False)
    passes = []
    embed = DevSet.embeddings
    monkeypatch.setattr(DevSet, "embeddings",
                        lambda self, model, bf16=True: passes.append(self is dev) or embed(self, model, bf16))
    encoded = Counter()
    encode = train.encode
    monkeypatch.setattr(train, "encode", lambda model, texts, **kw: encoded.update(texts) or encode(model, texts, **kw))
    config = TrainingConfig(batch_size=8, max_seq_length=32, epochs=1, learning_rate=1e-4, bf16=False,
                            merge_weights=(1.0, 0.5, 0.0))
    result = train_encoder(encoders.DEFAULT_BASE_MODEL, pairs.head(32), tmp_path, config, dev,
                           base_dev_embeddings=base_dev)
    assert passes == [True, True]
    assert {encoded[text] for text in dev.corpus.values()} == {2}  # not a third time for the rotation
    assert {encoded[text] for text in pairs["positive"][:32]} == {1}  # the rotation's other documents
    assert result.merge["dev_ndcg_at_10"]["1"] == round(result.dev_history[-1]["ndcg@10"], 4)
    assert result.merge["dev_ndcg_at_10"]["0"] == round(float(np.mean(list(dev.scores(base_dev).values()))), 4)
    saved = encoders.load_encoder(str(tmp_path / "model"), max_seq_length=32)
    embedded = embed(dev, saved, bf16=False)
    assert result.dev_fingerprint == dev.fingerprint()
    assert result.dev_per_query == pytest.approx(dev.scores(embedded), abs=1e-6)  # what the sweep reads
    assert result.dev_ndcg_at_10 == pytest.approx(np.mean(list(dev.scores(embedded).values())), abs=1e-4)
    assert result.dev_ndcg_at_10_truncated == pytest.approx(
        np.mean(list(dev.scores(embedded, result.matryoshka_dim).values())), abs=1e-4)


def test_training_uses_bf16_mixed_precision_only_where_the_hardware_computes_it(monkeypatch):
    from encoder_pipeline.lib import train

    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(train, "native_bf16", lambda native=native: native)
        assert train.mixed_bf16() is native  # an AVX2-only CPU would emulate bf16: fp32 there


def test_an_encoder_handle_runs_another_model_the_same_way_and_crosses_processes():
    import pickle

    handle = encoders.EncoderHandle(encoders.DEFAULT_BASE_MODEL, bf16=False, trust_remote_code=False)
    other = handle.at("/models/other")
    assert (other.model, other.bf16, other.max_seq_length) == ("/models/other", False, 128)
    assert pickle.loads(pickle.dumps(handle)) == handle  # Daft's and Ray's workers receive it pickled
    texts = ["copy a directory tree", "wrap text to a width"]
    expected = encoders.encode(encoders.load_encoder(encoders.DEFAULT_BASE_MODEL), texts, bf16=False)
    np.testing.assert_allclose(handle.encode(texts), expected, atol=1e-6)
    np.testing.assert_allclose(handle.bound()(texts[:1], batch_size=1), expected[:1], atol=1e-5)


def test_dev_distractors_are_the_queries_lexical_neighbours_then_a_seeded_fill():
    words = random.Random(0)
    texts = [" ".join(words.sample([f"w{i}" for i in range(2000)], 8)) for _ in range(300)]
    texts[17], texts[203] = "a stable merge sort algorithm", "a binary heap as a priority queue"
    queries = ["stable merge sort", "priority queue heap"]
    picked = lexical_distractors(queries, texts, count=6, seed=0)
    # only two units share a word with the queries: both are in, the other four are the seeded fill
    assert len(set(picked)) == 6 and picked[:2] == [17, 203]
    assert lexical_distractors(queries, texts, count=6, seed=0) == picked
    assert lexical_distractors(queries, texts, count=6, seed=1)[:2] == [17, 203]
    assert lexical_distractors(queries, texts, count=400) == list(range(300))
