"""Which extractors a corpus supports: every extractor runs on a sample of its units, and those that
yield usable pairs are chosen (`encoder-pipeline domain add` writes the choice into the spec, with a
comment per extractor saying what it found; a spec's `pair_extractor = "auto"` is resolved the same
way at run time).

Rules: a structural extractor is used when it gives pairs for at least MIN_STRUCTURAL_SHARE of the
sampled units. Structure-free extractors are added when the structural ones are expected to give
fewer than STRUCTURAL_ENOUGH pairs over the whole corpus; `inverse_cloze` where units have sentences,
`cropping` where they are long enough (code: cropping only), both when there is no structure at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from encoder_pipeline.lib.extractors.base import REGISTRY, STRUCTURAL_ENOUGH, ExtractorConfig

MIN_STRUCTURAL_SHARE = 0.10
MIN_FREE_SHARE = 0.05
SAMPLE_UNITS = 2000
# Lines that read as source code rather than prose.
_CODE_LINE = re.compile(r"^\s*(def |class |function\b|fn |func |public |private |static |import |from \S+ import|"
                        r"#include|package |SELECT |CREATE |var |let |const |return\b)|[;{}]\s*$|\)\s*:\s*$")


@dataclass
class Choice:
    """The extractors to use, one line per extractor on what it found, and whether it is code."""

    keys: list[str]
    notes: list[str] = field(default_factory=list)
    code: bool = False


def looks_like_code(texts: pd.Series) -> bool:
    """Most units have several lines that read as source code."""
    def code_lines(text: str) -> int:
        return sum(bool(_CODE_LINE.search(line)) for line in (text or "").splitlines())
    sample = texts.head(SAMPLE_UNITS)
    return bool(len(sample)) and (sample.map(code_lines) >= 2).mean() >= 0.5


def choose_extractors(units: pd.DataFrame, corpus_units: int, config: ExtractorConfig) -> Choice:
    """The extractors for a corpus of `corpus_units` units, judged on `units` (a sample of them)."""
    sample = units.sample(min(SAMPLE_UNITS, len(units)), random_state=config.seed) if len(units) else units
    scale = corpus_units / max(1, len(sample))
    chosen, notes = [], []
    expected = 0.0
    code = looks_like_code(sample["text"])
    for key, extractor in REGISTRY.items():
        if not extractor.structural or (code and key == "heading"):  # code's short lines are no headings
            continue
        found = extractor.extract(sample, config)
        share = len(found.pairs) / max(1, len(sample))
        queries = found.pairs["query"].nunique()
        used = share >= MIN_STRUCTURAL_SHARE
        if used:
            chosen.append(key)
            expected += len(found.pairs) * scale
        why = "; ".join(f"{n:,} {reason}" for reason, n in found.rejected.items() if n)
        notes.append(f"{key}: {queries:,} distinct queries over {len(sample):,} sampled units "
                     f"({share:.0%} of units), {'used' if used else 'not used'}"
                     + (f" ({why})" if why and not used else ""))
    if expected < STRUCTURAL_ENOUGH:
        free = {key: extractor.extract(sample, config) for key, extractor in REGISTRY.items()
                if not extractor.structural}
        shares = {key: len(found.pairs) / max(1, len(sample)) for key, found in free.items()}
        # Code has no sentences to cut out, only spans to crop.
        usable = [key for key, share in shares.items()
                  if share >= MIN_FREE_SHARE and not (code and key == "inverse_cloze")]
        picked = usable if not chosen else usable[:1]
        chosen += picked
        for key, share in shares.items():
            notes.append(f"{key}: pairs from {share:.0%} of sampled units, "
                         f"{'used' if key in picked else 'not used'} (structure-free; structural pairs "
                         f"expected: {expected:,.0f} < {STRUCTURAL_ENOUGH})")
    else:
        notes.append(f"structure-free extractors not needed: ~{expected:,.0f} structural pairs expected")
    return Choice(chosen, notes, code)
