"""The report's arithmetic and figures: fusion, paired significance, migration, promotion, PNGs."""

import base64
import io

import numpy as np
import pytest

from encoder_pipeline.lib.metrics import evaluate
from encoder_pipeline.lib.report import (
    bootstrap_interval,
    judged_share,
    ladder_figure,
    ladder_png,
    ladder_significance,
    latency_png,
    md_image,
    migration,
    paired_randomization_test,
    regressions_in_words,
    rrf_fuse,
    safe_to_promote,
    sweep_figure,
    sweep_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rrf_sums_reciprocal_ranks_across_runs():
    bm25 = {"q": {"a": 12.0, "b": 7.0, "c": 1.0}}
    dense = {"q": {"b": 0.9, "d": 0.8, "a": 0.1}}
    fused = rrf_fuse([bm25, dense], k=60)
    assert fused["q"]["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert fused["q"]["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["q"]["d"] == pytest.approx(1 / 62)
    assert list(fused["q"])[:2] == ["b", "a"]  # found high by both beats found first by one


def test_rrf_keeps_queries_only_one_run_answered_and_cuts_depth():
    fused = rrf_fuse([{"q1": {"a": 1.0}}, {"q2": {f"d{i}": -i for i in range(20)}}], depth=5)
    assert set(fused) == {"q1", "q2"} and len(fused["q2"]) == 5
    assert max(fused["q2"], key=fused["q2"].get) == "d0"


def test_rrf_of_one_run_preserves_its_order():
    run = {"q": {"x": 0.2, "y": 0.9, "z": 0.5}}
    assert list(rrf_fuse([run])["q"]) == ["y", "z", "x"]


def test_identical_systems_have_p_one():
    rows = {f"q{i}": {"ndcg@10": v} for i, v in enumerate(np.linspace(0, 1, 50))}
    diff, p = paired_randomization_test(rows, rows, iterations=2000, seed=1)
    assert diff == 0.0 and p == 1.0


def test_clearly_different_systems_have_small_p():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=100)
    a = {f"q{i}": float(v + 0.2) for i, v in enumerate(base)}
    b = {f"q{i}": float(v) for i, v in enumerate(base)}
    diff, p = paired_randomization_test(a, b, iterations=5000, seed=0)
    assert diff == pytest.approx(0.2)
    assert p == pytest.approx(1 / 5001)
    assert paired_randomization_test(b, a, iterations=5000, seed=0) == (pytest.approx(-0.2), p)


def test_noise_is_not_significant_and_the_test_is_reproducible():
    rng = np.random.default_rng(3)
    a = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(size=80))}
    b = {q: float(np.clip(v + rng.normal(scale=0.05), 0, 1)) for q, v in a.items()}
    first = paired_randomization_test(a, b, iterations=3000, seed=7)
    assert first == paired_randomization_test(a, b, iterations=3000, seed=7)
    assert first[1] > 0.05


def test_randomization_reads_evaluate_rows_and_counts_missing_queries_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    _, good = evaluate({"q1": {"a": 1.0}, "q2": {"b": 1.0}}, qrels)
    diff, _ = paired_randomization_test(good, {"q1": good["q1"]}, iterations=100)
    assert diff == pytest.approx(0.5)


def test_ladder_significance_and_regressions_in_words():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, size=60)
    per_query = {
        "off_the_shelf": {f"q{i}": v for i, v in enumerate(base)},
        "rung_a": {f"q{i}": v + 0.3 for i, v in enumerate(base)},
        "rung_b": {f"q{i}": v + 0.1 for i, v in enumerate(base)},
    }
    rows = ladder_significance(per_query, ["off_the_shelf", "rung_a", "rung_b"], "off_the_shelf",
                               iterations=2000)
    assert rows["off_the_shelf"]["p_vs_below"] is None and rows["off_the_shelf"]["p_vs_baseline"] is None
    assert rows["rung_a"]["diff_vs_below"] == pytest.approx(0.3) and rows["rung_a"]["p_vs_below"] < 0.01
    assert rows["rung_b"]["below"] == "rung_a" and rows["rung_b"]["diff_vs_below"] == pytest.approx(-0.2)
    assert rows["rung_b"]["diff_vs_baseline"] == pytest.approx(0.1)
    scores = {name: float(np.mean(list(v.values()))) for name, v in per_query.items()}
    sentences = regressions_in_words(rows, scores)
    assert len(sentences) == 1 and sentences[0].startswith("rung_b is worse than rung_a")
    assert "significant" in sentences[0]


def test_migration_on_hand_made_runs():
    old = {"q1": {f"d{i}": 10 - i for i in range(10)},  # d0..d9
           "q2": {"x": 1.0, "y": 0.5}}
    new = {"q1": {f"d{i}": 20 - i for i in range(5, 15)},  # d5..d14: 5 shared, different top-1
           "q2": {"x": 0.9, "z": 0.8},  # shares x, same top-1
           "q3": {"a": 1.0}}  # only in new: not compared
    view = migration(old, new)
    assert view["queries"] == 2
    assert view["top10_overlap"] == pytest.approx((5 / 10 + 1 / 2) / 2)
    assert view["top1_agreement"] == pytest.approx(0.5)
    same = migration(old, old)
    assert same["top10_overlap"] == 1.0 and same["top1_agreement"] == 1.0


def test_promotion_rule():
    assert safe_to_promote(0.70, 0.69, None, 0.01)[0]
    assert safe_to_promote(0.685, 0.69, None, 0.01)[0]  # within tolerance of the base model
    ok, why = safe_to_promote(0.60, 0.69, None, 0.01)
    assert not ok and "off-the-shelf" in why
    ok, why = safe_to_promote(0.70, 0.60, 0.75, 0.01)
    assert not ok and "currently served" in why
    assert safe_to_promote(0.75, 0.60, 0.75, 0.01)[0]


def _assert_png(data: bytes):
    from PIL import Image

    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    image.verify()
    assert image.size[0] > 100 and image.size[1] > 100


def test_plots_are_valid_pngs():
    _assert_png(ladder_png({"bm25": 0.4, "off_the_shelf": 0.55, "encoder_heuristic": 0.6}, target=0.65))
    point = {"dims": 384, "precision": "fp32", "bytes": 4_600_000,
             "dev": {"ndcg@10": 0.7, "recall@100": 0.9}, "eval": {"ndcg@10": 0.68, "recall@100": 0.9}}
    small = {**point, "dims": 96, "precision": "int8", "bytes": 300_000,
             "dev": {"ndcg@10": 0.66, "recall@100": 0.85}, "eval": {"ndcg@10": 0.65, "recall@100": 0.86}}
    _assert_png(sweep_png([point, small], chosen=small, target_ndcg=0.65, target_mb=5.0))
    _assert_png(latency_png(list(np.random.default_rng(0).gamma(4, 2, size=300)), target_ms=15.0))


def _outside_the_axes(fig) -> bool:
    """Whether the figure's legend lies wholly outside its axes' plotting area (so it hides nothing)."""
    fig.canvas.draw()
    [ax] = fig.axes
    legend = ax.get_legend().get_window_extent()
    box = ax.get_window_extent()
    return legend.x0 >= box.x1 or legend.y0 >= box.y1 or legend.x1 <= box.x0 or legend.y1 <= box.y0


def test_the_sweep_labels_only_the_chosen_point_and_its_legend_hides_nothing():
    points = [{"dims": d, "precision": p, "bytes": d * b, "dev": {"ndcg@10": 0.6 + d / 5000},
               "eval": {"ndcg@10": 0.58 + d / 5000}}
              for d in (48, 96, 192, 384) for p, b in (("fp32", 16000), ("fp16", 8000), ("int8", 4000),
                                                        ("binary+int8", 4500))]
    chosen = points[5]
    fig = sweep_figure(points, chosen, target_ndcg=0.65, target_mb=5.0)
    [ax] = fig.axes
    assert [t.get_text() for t in ax.texts] == ["96 dims, fp16"]
    assert _outside_the_axes(fig)
    assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]  # no crowded minor labels


def test_the_ladders_legend_hides_no_bar():
    fig = ladder_figure({"bm25": 0.4, "off_the_shelf": 0.95, "encoder_heuristic": 0.97}, target=0.65)
    assert _outside_the_axes(fig)
    assert len(fig.axes[0].patches) == 3


def test_markdown_image_embeds_the_png():
    png = ladder_png({"a": 0.5})
    markdown = md_image(png, "ladder")
    assert markdown.startswith("![ladder](data:image/png;base64,") and markdown.endswith(")")
    assert base64.b64decode(markdown[len("![ladder](data:image/png;base64,"):-1]) == png


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_queries():
    few = {f"q{i}": {"ndcg@10": float(i % 2)} for i in range(10)}
    many = {f"q{i}": {"ndcg@10": float(i % 2)} for i in range(400)}
    low, high = bootstrap_interval(few, sorted(few), seed=0)
    assert low < 0.5 < high and high - low > 0.3
    low_many, high_many = bootstrap_interval(many, sorted(many), seed=0)
    assert low_many < 0.5 < high_many and high_many - low_many < 0.15
    # a query the system answered nothing for counts 0, as in the figure itself
    assert bootstrap_interval({}, ["q1", "q2"]) == (0.0, 0.0)


def test_judged_share_counts_judgments_of_either_label_in_the_top_10():
    qrels = {"q1": {"a": 1, "b": 0}, "q2": {"c": 1}}
    run = {"q1": {"a": 3.0, "b": 2.0, "x": 1.0, "y": 0.5}, "q2": {"z": 2.0, "c": 1.0}}
    assert judged_share(run, qrels) == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert judged_share({"q1": {"x": 1.0}}, qrels) == 0.0  # unjudged only
