"""Generate from a trained run: `python -m stepdpo.generate RUN_DIR "question" [--max-new-tokens N]`.

Generation ends where the run's evaluation ended it: at most its `eval.max_new_tokens` new tokens (unless
`--max-new-tokens` says otherwise) and at its `eval.stop` strings, both read from the run's config_resolved.yaml;
an answer cut off at the limit is marked as such.

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
    from .model import ModelSpec, QuantSpec, load_base, peft_quietly

    with peft_quietly():
        from peft import PeftModel

    quant = QuantSpec() if meta.get("load_in_4bit") else None
    base, tok = load_base(ModelSpec(name="base", path=meta["base_model"], prompt_format=fmt.style,
                                    system_prompt=fmt.system, chat_template_kwargs=fmt.template_kwargs), quant=quant)
    with peft_quietly():
        model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval(), tok


def eval_settings(run_dir: str | Path) -> tuple[int, list[str]]:
    """(max_new_tokens, stop strings) the run evaluated with, from its config_resolved.yaml; (128, []) for a run
    directory without one."""
    from .generation import stop_from_config

    path = Path(run_dir) / "config_resolved.yaml"
    if not path.is_file():
        return 128, []
    from omegaconf import OmegaConf

    e = OmegaConf.load(path).get("eval") or {}
    return int(e.get("max_new_tokens", 128)), stop_from_config(e.get("stop") or [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stepdpo.generate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory written by python -m stepdpo.run")
    ap.add_argument("question", nargs="+", help="one or more questions")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
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
    limit, stop = eval_settings(args.run_dir)
    limit = args.max_new_tokens or limit
    outs = generate(model, tok, [format_prompt(q, tok) for q in args.question], max_new_tokens=limit,
                    do_sample=args.sample, temperature=args.temperature, seed=args.seed, stop=stop or None)
    for q, (c,) in zip(args.question, outs):
        cut = f"\n[cut off at {limit} new tokens: --max-new-tokens raises the limit]" if c.finish_reason == "length" else ""
        print(f"{format_prompt(q, tok)}{c.text}{cut}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
