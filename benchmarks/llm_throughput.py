"""Local LLM throughput: passages per second, unbatched vs batched `generate`, in one run.

    python benchmarks/llm_throughput.py --passages 16 --batch-size 8

Uses the offline default (gemma-3-270m Q4_K_M through transformers) on real passages of the `code`
corpus, with the pipeline's own prompts; no cache, so every call is generated.
"""

import argparse
import tempfile
import time

from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
from encoder_pipeline.lib.llm import GenerationParams, LocalGGUFBackend, ensure_local_gguf
from encoder_pipeline.lib.queries import PromptSpec, build_prompts
from encoder_pipeline.lib.sources import read_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    units, _ = clean_corpus(read_corpus("python_stdlib", ""),
                            CleaningConfig(min_words=5, normalize_whitespace=False, max_documents=400))
    units = units.head(args.passages)
    spec = PromptSpec("a short description of what a function does", "the function does it", ())
    prompts = [p["prompt"] for p in build_prompts(spec, list(units["doc_id"]),
                                                  list(units["title"] + "\n" + units["text"]), 1, 0)]
    params = GenerationParams(max_new_tokens=24)
    with tempfile.TemporaryDirectory() as models:
        path = ensure_local_gguf(models)
        single = LocalGGUFBackend(path, batch_size=1)
        started = time.perf_counter()
        single.generate(prompts[:1], params)  # load + warm up
        load_seconds = time.perf_counter() - started
        rates = {}
        for label, batch in (("unbatched", 1), (f"batched x{args.batch_size}", args.batch_size)):
            single.batch_size = batch
            started = time.perf_counter()
            single.generate(prompts, params)
            rates[label] = len(prompts) / (time.perf_counter() - started)
    print(f"load + first call: {load_seconds:.1f} s; {len(prompts)} passages, 24 new tokens each\n")
    print("| mode | passages/s | s/passage | x unbatched |\n|---|---|---|---|")
    base = rates["unbatched"]
    for label, rate in rates.items():
        print(f"| {label} | {rate:.2f} | {1 / rate:.2f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
