"""Generate from a trained run: `python -m stepdpo.generate RUN_DIR "question" [--max-new-tokens N]`.

Loads the run's base model (the SFT checkpoint or hub model it recorded in adapter/stepdpo.json,
in 4-bit again if it was trained with qlora, with the prompt format it was trained with) and the LoRA adapter with
`peft.PeftModel.from_pretrained`, or the fully fine-tuned model (`lora=none`), then decodes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_trained(run_dir: str | Path):
    """(model, tokenizer) from a finished run directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    adapter, full = run_dir / "adapter", run_dir / "model"
    from .data import PromptFormat, set_prompt_format

    meta_path = (full if full.is_dir() else adapter) / "stepdpo.json"
    if not meta_path.is_file() and not full.is_dir():
        raise FileNotFoundError(f"{run_dir}: no adapter/stepdpo.json or model/ — is this a finished stepdpo run directory?")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    fmt = PromptFormat(meta.get("prompt_format", "plain"), meta.get("system_prompt"),
                       meta.get("chat_template_kwargs") or {})  # as in training
    if full.is_dir():
        return AutoModelForCausalLM.from_pretrained(full), set_prompt_format(AutoTokenizer.from_pretrained(full), fmt)
    from peft import PeftModel

    from .model import ModelSpec, QuantSpec, load_base

    quant = QuantSpec() if meta.get("load_in_4bit") else None
    base, tok = load_base(ModelSpec(name="base", path=meta["base_model"], prompt_format=fmt.style,
                                    system_prompt=fmt.system, chat_template_kwargs=fmt.template_kwargs), quant=quant)
    model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval(), tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stepdpo.generate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory written by python -m stepdpo.run")
    ap.add_argument("question", nargs="+", help="one or more questions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from .data import format_prompt
    from .generation import generate

    try:
        model, tok = load_trained(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = generate(model, tok, [format_prompt(q, tok) for q in args.question], max_new_tokens=args.max_new_tokens,
                    do_sample=args.sample, temperature=args.temperature, seed=args.seed)
    for q, (c,) in zip(args.question, outs):
        print(f"{format_prompt(q, tok)}{c.text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
