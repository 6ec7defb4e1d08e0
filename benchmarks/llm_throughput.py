"""Local LLM throughput: passages per second, unbatched vs batched `generate`, in one run.

    python benchmarks/llm_throughput.py --passages 32 --batch-size 16

Uses the offline default (gemma-3-270m Q4_K_M through transformers) on real passages of the `code`
corpus with the prompts `synthetic_queries` sends: the code domain's few-shot examples and the
pipeline's generation settings. No response cache, so every call is generated. Two baselines: stock
transformers (`model.generate` on one prompt at a time with its own samplers, decoding to
`max_new_tokens`: what a first notebook does), and the backend's own path one prompt at a time with
the shared-prefix KV cache off (so the batching gain is not confused with the first-line stop). The
backend's modes run its default precision (bf16 weights on a CPU with native bf16), and the default
batched path once more in fp32, for the precision's share; stock generate stays fp32.
Each mode has its own backend (sharing the loaded model), so a cached mode pays for computing its
prefix, and the modes take turns on groups of passages (one `generate_cached` call of the batched
backend), so a load swing from other jobs hits every mode.
"""

import argparse
import os
import tempfile
import time

from encoder_pipeline.domains import load_domain
from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.llm import Completion, GenerationParams, LocalGGUFBackend, ensure_local_gguf
from encoder_pipeline.lib.llm.local_gguf import _load_gguf
from encoder_pipeline.lib.queries import PromptSpec, build_prompts, parse_query
from encoder_pipeline.lib.sources import read_corpus
from encoder_pipeline.resources import LLMResource


class StockGenerate:
    """One prompt per `model.generate` call with transformers' samplers, to `max_new_tokens`."""

    def __init__(self, path: str):
        self.path = path

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        import torch

        tokenizer, model = _load_gguf(self.path)
        completions = []
        for prompt in prompts:
            batch = tokenizer(prompt, return_tensors="pt")
            torch.manual_seed(params.seed)
            with torch.inference_mode():
                output = model.generate(**batch, do_sample=True, temperature=params.temperature,
                                        top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                                        no_repeat_ngram_size=params.no_repeat_ngram_size,
                                        pad_token_id=tokenizer.pad_token_id)
            new = output[0, batch["input_ids"].shape[1] :]
            completions.append(Completion(text=tokenizer.decode(new, skip_special_tokens=True),
                                          prompt_tokens=batch["input_ids"].shape[1],
                                          completion_tokens=len(new)))
        return completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    spec = load_domain("code")
    units, _ = clean_corpus(read_corpus("python_stdlib", ""),
                            CleaningConfig(min_words=5, normalize_whitespace=False, max_documents=400))
    units = units.head(args.passages)
    passages = document_texts(units["title"], units["text"])
    prompt_spec = PromptSpec(spec.queries.form, spec.queries.relevance,
                             tuple((e.passage, e.query) for e in spec.queries.examples))
    prompts = [p["prompt"] for p in build_prompts(prompt_spec, list(units["doc_id"]), passages, 1, 0)]
    examples = [e.query for e in spec.queries.examples]
    params = LLMResource().params(0)
    # (label, batch size (0: stock generate), prefix cache, bf16 weights where the CPU has native bf16)
    modes = (("stock transformers generate, unbatched", 0, False, False),
             ("unbatched, no prefix cache", 1, False, True), ("unbatched", 1, True, True),
             (f"batched x{args.batch_size}, no prefix cache", args.batch_size, False, True),
             (f"batched x{args.batch_size}, fp32 weights", args.batch_size, True, False),
             (f"batched x{args.batch_size}", args.batch_size, True, True))
    with tempfile.TemporaryDirectory() as models:
        path = ensure_local_gguf(models)
        started = time.perf_counter()
        LocalGGUFBackend(path).generate(prompts[:1], params)  # load + warm up
        print(f"load + first call: {time.perf_counter() - started:.1f} s; {len(prompts)} passages, "
              f"at most {params.max_new_tokens} new tokens each; load average "
              f"{os.getloadavg()[0]:.1f} before\n", flush=True)
        backends = {label: LocalGGUFBackend(path, batch_size=size, prefix_cache=cache, bf16=bf16) if size
                    else StockGenerate(str(path)) for label, size, cache, bf16 in modes}
        seconds = dict.fromkeys(backends, 0.0)
        completions: dict[str, list] = {label: [] for label in backends}
        # the modes take turns, one call's worth of passages each (what generate_cached sends the
        # batched backend), so load from other jobs hits all alike
        call = backends[modes[-1][0]].prompts_per_call
        for start in range(0, len(prompts), call):
            group = prompts[start : start + call]
            for label, backend in backends.items():
                started = time.perf_counter()
                completions[label] += backend.generate(group, params)
                seconds[label] += time.perf_counter() - started
    print("| mode | passages/s | s/passage | x stock | x unbatched | new tokens / passage | queries parsed |")
    print("|---|---|---|---|---|---|---|")
    stock, base = seconds[modes[0][0]], seconds[modes[1][0]]
    for label, done in completions.items():
        parsed = sum(parse_query(c.text, passage, examples) is not None
                     for c, passage in zip(done, passages))
        tokens = sum(c.completion_tokens for c in done) / len(done)
        print(f"| {label} | {len(done) / seconds[label]:.2f} | {seconds[label] / len(done):.2f} | "
              f"{stock / seconds[label]:.2f} | {base / seconds[label]:.2f} | {tokens:.1f} | "
              f"{parsed}/{len(done)} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
