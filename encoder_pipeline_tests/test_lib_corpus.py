"""Corpus cleaning on real data: the standard-library code corpus and the shared BEIR corpora."""

import itertools
import json

import numpy as np
import pytest

from encoder_pipeline.lib.corpus import (
    CleaningConfig,
    chunk_words,
    clean_corpus,
    near_duplicate_groups,
    sample_ids,
)
from encoder_pipeline.lib.extractors.docstring import summary_line
from encoder_pipeline.lib.formats.python_stdlib import read_python_stdlib
from encoder_pipeline.lib.sources import read_corpus


@pytest.fixture(scope="module")
def stdlib():
    return read_python_stdlib(exclude=[])


def test_stdlib_units_drop_their_docstring(stdlib):
    by_id = {u["doc_id"]: u for u in stdlib}
    unit = by_id["json.decoder:JSONDecoder.decode"]
    assert unit["anchor"].startswith("Return the Python representation of")
    assert "Return the Python representation" not in unit["text"]
    assert unit["text"].startswith("def decode(self, s, _w=WHITESPACE.match):")
    assert len(by_id) == len(stdlib), "ids are unique"
    assert not any(u["doc_id"].startswith(("test.", "idlelib.")) for u in stdlib)
    assert len(stdlib) > 5000


def test_summary_line_takes_first_paragraph():
    assert summary_line("  Parse a date.\n  More words.\n\n  Details here.") == "Parse a date. More words."


def test_chunking_keeps_every_word():
    text = " ".join(f"w{i}" for i in range(25))
    pieces = chunk_words(text, 10)
    assert [len(p.split()) for p in pieces] == [10, 10, 5]
    assert " ".join(pieces).split() == text.split()
    assert chunk_words(text, 0) == [text]


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_minhash_groups_match_exact_jaccard(stdlib):
    """LSH + verification finds the same near-duplicate pairs as brute-force Jaccard on shingles."""
    import daft
    from daft import col
    from daft.functions import minhash, normalize

    units = [u for u in stdlib if u["doc_id"].startswith(("_pydecimal:Decimal.", "_pyio:", "io:"))][:300]
    frame = daft.from_pylist(units)
    key = normalize(col("text"), remove_punct=True, lowercase=True, white_space=True)
    rows = frame.select(col("doc_id"), key.alias("key"),
                        minhash(key, num_hashes=128, ngram_size=3, seed=1).alias("sig")).to_pydict()
    signatures = np.array(rows["sig"], dtype=np.uint32)
    groups = near_duplicate_groups(rows["doc_id"], signatures, bands=32, threshold=0.8)
    found = {frozenset(p) for g in groups for p in itertools.combinations(g, 2)}
    shingles = {d: {tuple(k.split()[i:i + 3]) for i in range(max(1, len(k.split()) - 2))}
                for d, k in zip(rows["doc_id"], rows["key"])}
    truth = {frozenset((a, b)) for a, b in itertools.combinations(rows["doc_id"], 2)
             if _jaccard(shingles[a], shingles[b]) >= 0.9}
    assert truth, "the fixture has true near-duplicates (Decimal's logical_and/or/xor)"
    recall = len(truth & found) / len(truth)
    assert recall >= 0.9
    far = [p for p in found if _jaccard(*(shingles[d] for d in p)) < 0.6]
    assert not far, f"pairs far below the threshold were merged: {far[:3]}"


def test_clean_corpus_counts_and_dedupes(tmp_path):
    docs = [
        {"_id": "a", "title": "Intro", "text": "The quick brown fox jumps over the lazy dog today."},
        {"_id": "b", "title": "Intro", "text": "The quick brown fox jumps over the lazy dog today."},
        {"_id": "c", "title": "Other", "text": "Completely different words about retrieval encoders."},
        {"_id": "d", "title": "", "text": "too short"},
        {"_id": "e", "title": "Caf\u0065\u0301", "text": "Unicode   accents\n\nare normalized here ok."},
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    units, report = clean_corpus(read_corpus("jsonl", str(path)), CleaningConfig(min_words=4))
    assert report.counts["read"] == 5
    assert report.counts["dropped_short_or_empty"] == 1
    assert report.counts["exact_duplicates"] == 1
    assert sorted(units["doc_id"]) == ["a", "b", "c", "e"]  # the duplicate is served...
    marked = units.set_index("doc_id")
    assert marked.loc["b", "duplicate_of"] == "a" and marked["duplicate_of"].drop("b").isna().all()
    assert list(units.loc[units["in_sample"], "doc_id"]) == ["a", "c", "e"]  # ...and never trained on
    accented = units.set_index("doc_id").loc["e"]
    assert accented["title"] == "Caf\u00e9" and accented["text"] == "Unicode accents are normalized here ok."


def test_judged_documents_are_never_dropped(tmp_path):
    docs = [{"_id": i, "title": "", "text": "identical text for every one of these docs"}
            for i in ("x", "y", "z")]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    units, _ = clean_corpus(read_corpus("jsonl", str(path)), CleaningConfig(), protected={"z"})
    marked = units.set_index("doc_id")["duplicate_of"]
    assert marked.fillna("").to_dict() == {"x": "z", "y": "z", "z": ""}  # the judged one is the original
    assert list(units.loc[units["in_sample"], "doc_id"]) == ["z"]


def test_near_duplicates_in_wording_are_served_but_not_trained_on(tmp_path):
    """Gene Ontology siblings whose definitions differ by one word are near-duplicates by MinHash
    and different concepts: both are served (a user searching "meiotic G2 phase" must find it), one
    is left out of training (a near-copy in a batch is a false negative)."""
    definition = ("The cell cycle 'gap' phase which is the interval between the completion of DNA "
                  "synthesis and the beginning of DNA segregation by {}.")
    docs = [{"_id": "GO:0000085", "title": "mitotic G2 phase", "text": definition.format("mitosis")},
            {"_id": "GO:0051331", "title": "meiotic G2 phase", "text": definition.format("meiosis")},
            {"_id": "GO:0006096", "title": "glycolytic process",
             "text": "The chemical reactions and pathways resulting in the breakdown of a carbohydrate into pyruvate."}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    units, report = clean_corpus(read_corpus("jsonl", str(path)), CleaningConfig())
    assert report.counts["near_duplicates"] == 1 and report.counts["kept"] == 3
    assert report.duplicate_examples == [("GO:0000085", "GO:0051331")]
    marked = units.set_index("doc_id")
    assert marked.loc["GO:0051331", "duplicate_of"] == "GO:0000085"
    assert not marked.loc["GO:0051331", "in_sample"] and marked.loc[["GO:0000085", "GO:0006096"], "in_sample"].all()


def test_long_documents_are_chunked_under_their_parent(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"_id": "long", "title": "T", "text": " ".join(f"w{i}" for i in range(26))}))
    units, report = clean_corpus(read_corpus("jsonl", str(path)), CleaningConfig(max_words=10))
    assert list(units["doc_id"]) == ["long#0", "long#1", "long#2"]
    assert set(units["parent_id"]) == {"long"}


def test_sample_keeps_protected_ids():
    ids = [f"d{i}" for i in range(100)]
    chosen = sample_ids(ids, 10, protected={"d99", "d98"}, seed=0)
    assert len(chosen) == 10 and {"d99", "d98"} <= chosen
    assert chosen == sample_ids(ids, 10, protected={"d99", "d98"}, seed=0)


def test_beir_corpus_reads_with_judged_docs(tmp_path):
    from conftest import shared_corpus

    from encoder_pipeline.lib.sources import read_judged

    location = shared_corpus("web_qa/python_docs")
    queries, qrels = read_judged(str(location))
    assert len(queries) == 175 and all(len(r) == 1 for r in qrels.values())
    judged = {d for r in qrels.values() for d in r}
    units, _ = clean_corpus(read_corpus("beir", str(location)),
                            CleaningConfig(max_documents=600, min_words=20, max_words=300),
                            protected=judged)
    assert judged <= set(units["parent_id"])


def test_streaming_clean_writes_one_ordered_file_and_a_content_fingerprint(tmp_path):
    """The asset's path: units stream to one Parquet file in source order, the scratch file is
    gone, and the fingerprint follows the content (same input, same print; one edit, a new one)."""
    import pyarrow.parquet as pq

    from encoder_pipeline.lib.corpus import DUPLICATE_COLUMN, SAMPLE_COLUMN, UNIT_COLUMNS, clean_corpus_to_parquet

    docs = [{"_id": f"d{i:05d}", "title": f"T{i}", "text": f"unit {i} " + " ".join(f"w{i * 7 + j}" for j in range(12))}
            for i in range(5000)]
    docs[10]["text"] = docs[9]["text"]  # an exact duplicate of its neighbour once titles are equal
    docs[10]["title"] = docs[9]["title"]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "out" / "units.parquet"
    out.parent.mkdir()
    report = clean_corpus_to_parquet(read_corpus("jsonl", str(path)), CleaningConfig(), out)

    assert sorted(p.name for p in out.parent.iterdir()) == ["units.parquet"]
    table = pq.read_table(out)
    assert table.column_names == [*UNIT_COLUMNS, DUPLICATE_COLUMN, SAMPLE_COLUMN]
    ids = table.column("doc_id").to_pylist()
    assert ids == sorted(ids) and len(ids) == 5000 == report.counts["kept"]  # every unit, in order
    # no sample asked for: every unit is in it but the duplicate
    assert [i for i, s in zip(ids, table.column(SAMPLE_COLUMN).to_pylist(), strict=True) if not s] == ["d00010"]
    assert table.column(DUPLICATE_COLUMN).to_pylist()[10] == "d00009"

    again = clean_corpus_to_parquet(read_corpus("jsonl", str(path)), CleaningConfig(), tmp_path / "b.parquet")
    assert again.fingerprint == report.fingerprint
    docs[4000]["text"] += " edited"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    edited = clean_corpus_to_parquet(read_corpus("jsonl", str(path)), CleaningConfig(), tmp_path / "c.parquet")
    assert edited.fingerprint != report.fingerprint


def test_the_training_sample_marks_every_unit_keeps_judged_documents_and_survives_growth(tmp_path):
    """clean_corpus keeps the whole corpus and marks a stable sample of documents for training: the
    same ids give the same sample whatever their order, judged documents are always in it, and a
    corpus grown by 10% keeps about 90% of its sample (new documents enter in proportion)."""
    import pyarrow.parquet as pq

    from encoder_pipeline.lib.corpus import SAMPLE_COLUMN, clean_corpus_to_parquet

    def cleaned(count: int, name: str, reverse: bool = False) -> tuple[list[str], set[str]]:
        docs = [{"_id": f"d{i:05d}", "title": f"Title {i}", "text": f"document {i} " + " ".join(
            f"w{i * 11 + j}" for j in range(20))} for i in range(count)]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(d) for d in (reversed(docs) if reverse else docs)))
        out = tmp_path / f"{name}.parquet"
        report = clean_corpus_to_parquet(read_corpus("jsonl", str(path)), CleaningConfig(sample_documents=500),
                                         out, protected={"d01999", "d00001"})
        table = pq.read_table(out).to_pandas()
        assert report.sample_documents == len(set(table[table[SAMPLE_COLUMN]]["parent_id"]))
        return list(table["doc_id"]), set(table[table[SAMPLE_COLUMN]]["parent_id"])

    ids, sample = cleaned(2000, "base")
    assert len(ids) == 2000 and len(sample) == 500 and {"d01999", "d00001"} <= sample
    assert cleaned(2000, "reversed", reverse=True)[1] == sample
    grown_ids, grown_sample = cleaned(2200, "grown")
    assert len(grown_ids) == 2200 and len(grown_sample) == 500
    assert 0.85 <= len(sample & grown_sample) / 500 < 1.0
