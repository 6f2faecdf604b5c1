"""Token lengths of GSM8K and MATH-500 gold solutions and prompts under real tokenizers.

    python scripts/measure_lengths.py                                   # the Qwen3 tokenizer in ../shared
    python scripts/measure_lengths.py --tokenizer llama3=/tmp/llama31/package/models

The numbers behind the length presets (conf/dataset/gsm8k.yaml, conf/dataset/math.yaml: eval and
pairs max_new_tokens, trainer.max_length). Solutions are measured as the model sees them in
training (`data.response_text` of the loaded gold steps: GSM8K with its "#### x" line, MATH with
its sentence steps) + 1 for the end-of-turn token; prompts as `batching.encode_pair` builds them
(BOS + the chat template with the model preset's system prompt and the generation prompt, or the
plain "Question: ...\nAnswer:\n"). Prints one JSON line per tokenizer and dataset:
{"tokenizer", "dataset", "n", "solution": {p50, p90, p95, p99, max}, "prompt_chat": {...},
"prompt_plain": {...}, "pair_chat_p99": prompt p99 + solution p99, "over_96": share of solutions
> 96 tokens, "over_512_total": share of prompt+solution > 512}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = {"gsm8k": "Solve the math problem step by step, one step per line, and end with the final answer.",
          "math": "Please reason step by step, and put your final answer within \\boxed{}."}


def pct(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]  # nearest-rank percentile


def dist(xs: list[int]) -> dict:
    return {"p50": pct(xs, 50), "p90": pct(xs, 90), "p95": pct(xs, 95), "p99": pct(xs, 99), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", action="append", default=[],
                    help="name=dir (repeatable); default qwen3=../shared/tokenizers/qwen3")
    ap.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k"))
    ap.add_argument("--math", default=str(ROOT.parent / "shared/data/math500/test.jsonl"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from stepdpo.data import PromptFormat, encode_text, format_prompt, prompt_ids, response_text, set_prompt_format
    from stepdpo.datasets import gsm8k, math as math_ds

    toks = args.tokenizer or [f"qwen3={ROOT.parent / 'shared/tokenizers/qwen3'}"]
    data = {"gsm8k": (lambda b: b.train + b.eval)(gsm8k.load(path=args.gsm8k)),
            "math": (lambda b: b.train + b.eval)(math_ds.load(path=args.math, eval_fraction=0.2))}
    for spec in toks:
        name, _, path = spec.partition("=")
        tok = AutoTokenizer.from_pretrained(path)
        for ds, problems in data.items():
            sol = [len(encode_text(tok, response_text(p.steps))["input_ids"]) + 1 for p in problems]
            set_prompt_format(tok, PromptFormat("chat", SYSTEM[ds]))
            chat = [len(prompt_ids(tok, format_prompt(p.question, tok))) for p in problems]
            set_prompt_format(tok, PromptFormat("plain"))
            plain = [len(prompt_ids(tok, format_prompt(p.question, tok))) for p in problems]
            row = {"tokenizer": name, "dataset": ds, "n": len(problems), "solution": dist(sol),
                   "prompt_chat": dist(chat), "prompt_plain": dist(plain),
                   "pair_chat_p99": pct(chat, 99) + pct(sol, 99),
                   "over_96": round(sum(s > 96 for s in sol) / len(sol), 3),
                   "over_512_total": round(sum(a + b > 512 for a, b in zip(chat, sol)) / len(sol), 3)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
