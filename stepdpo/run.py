"""`python -m stepdpo.run`: the one entrypoint. Builds the pieces from config, runs the stages.

    setup           validate the config, seed, torchrun rank/world, build specs, scorer, pair builder, dataset;
                    refuse bad input that costs nothing to find (file scores a reward would replace, ...)
    load_model      the base model and tokenizer; `preflight` then checks the dataset's own pairs (fields,
                    token lengths vs trainer.max_length) before any SFT step or judge request
    sft_warmup      full fine-tune on gold solutions (or a resumed / cached warm-up), saved as base_model
    attach_adapter  (re)load the base through 4-bit if asked, add LoRA: (policy, reference)
    evaluate        accuracy before training
    build_pairs     one round of pairs: built (or the dataset's, or pairs_cache_dir's), validated, scored,
                    written; every round
    encode          pairs -> token-weighted examples (or SFT examples)
    preference_stage  the training loop (and later rounds' pairs, through build_pairs)
    finish          adapter, accuracy after, summary.json, table, plots

Returns the held-out accuracy after training (the sweep metric, e.g. for Optuna).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from . import progress
from .config import build, register_configs, to_container, validate_targets

log = logging.getLogger("stepdpo")
register_configs()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What `setup` builds and the later stages read (plus the tracker and the summary they fill)."""

    cfg: DictConfig
    out: Path
    rank: int  # torchrun: rank 0 logs, evaluates and writes
    world: int
    resume: Any  # checkpoint.Resume | None
    model_spec: Any
    lora_spec: Any
    scorer: Any
    engine: Any  # the `generation` group's backend: eval and on-policy sampling decode there
    pair_fn: Any  # the `pairs` group's builder: (problems, *, <the runtime inputs it names>) -> (pairs, report)
    bundle: Any  # datasets' DatasetBundle
    eval_problems: list
    uses_pairs: bool  # False: trainer=sft on gold solutions, no pairs at all
    tracker: Any = None
    summary: dict = field(default_factory=dict)
    step: int = 0  # global step: the warm-up's steps come first


def run(cfg: DictConfig, out: Path) -> float:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    s = setup(cfg, out)
    if getattr(s.scorer, "dry_run", False):  # reward.dry_run=true: say what judging would cost, then stop
        return dry_run(s)
    open_tracker(s)
    try:
        model, tok = load_model(s)
        preflight(s, tok)  # the dataset's own pairs vs the tokenizer: before any SFT step or judge request
        model, tok, base_path = sft_warmup(s, model, tok)
        policy, ref, tok = attach_adapter(s, model, tok, base_path)
        results = evaluate_before(s, policy, tok)
        t = time.perf_counter()
        pairs, s.summary["pairs"] = build_pairs(s, policy, tok, 0, s.step) if s.uses_pairs else (None, {"pairs": 0})
        examples = encode(s, pairs, tok, report=s.summary["pairs"])
        s.summary["time/pairs_s"] = time.perf_counter() - t
        log_pair_report(s, s.summary["pairs"], s.step)
        if cfg.validate_only:  # the first round's pairs only (later rounds need training)
            return report_validation(s)
        preference_stage(s, policy, ref, tok, examples)
        if s.rank > 0:  # rank 0 saves the adapter and evaluates
            return float("nan")
        return finish(s, policy, tok, base_path, results, t_start, cpu_start)
    finally:
        from .generation import set_backend

        set_backend(None)
        s.tracker.close()
        if hasattr(s.scorer, "close"):
            s.scorer.close()


# ----------------------------------------------------------------------------- stages


def setup(cfg: DictConfig, out: Path) -> Run:
    """Validate the config, seed, join torchrun, build every piece; refuse bad input found for free."""
    import torch

    from . import checkpoint, cpu_memory, distributed
    from .pairs import check_from_split, check_own_scores, score_pairs
    from .train import pick_device

    validate_targets(cfg)  # every key of every group, the trainer's choices, the pairs builder's settings
    progress.quiet_library_bars()  # no transformers tqdm lines in a log file
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)  # before any tensor work; also for jobs a sweep runs in-process
    if pick_device(cfg.trainer.get("device", "auto")).type == "cpu":  # before any bf16 matmul (eval, sampling)
        cpu_memory.bound(cfg.trainer.get("cpu_primitive_cache", 0), cfg.trainer.get("cpu_mmap_threshold_mb", 0))
    seed_everything(cfg.seed)
    rank, world = distributed.init()  # torchrun: DDP over `world` processes; rank 0 logs, evaluates, writes
    if world > 1:
        out = Path(distributed.broadcast(str(out)))  # ranks' clocks may name different run dirs: use rank 0's
    resume = checkpoint.resolve_resume(cfg.trainer.resume, out)  # None, or where to continue from
    model_spec, lora_spec = build(cfg.model, "model"), build(cfg.lora, "lora")
    scorer = build(cfg.reward, "reward")
    engine = build(cfg.generation, "generation")  # a missing vllm or a malformed server URL fails here, before any training
    pair_fn = build(cfg.pairs, "pairs")
    bundle = build(cfg.dataset, "dataset")
    log.info("dataset %s: %d train / %d eval problems%s", bundle.name, len(bundle.train), len(bundle.eval),
             f", {len(bundle.pairs)} pairs" if bundle.pairs is not None else "")
    uses_pairs = cfg.trainer.loss != "sft" or cfg.trainer.sft_data == "chosen"  # sft_data=chosen: SFT on chosen sides
    if cfg.trainer.rounds > 1 and uses_pairs and bundle.pairs is not None:
        raise ValueError(f"trainer.rounds={cfg.trainer.rounds}: rounds re-build pairs from the current policy, "
                         f"but dataset={cfg.dataset._target_} brings its own pairs; set trainer.rounds=1")
    if hasattr(scorer, "check_problems"):  # a scorer that knows only some tasks (reward=solver: countdown)
        scorer.check_problems([*bundle.train, *(bundle.pool or [])] if bundle.pairs is None else bundle.pairs,
                              where=str(cfg.dataset.get("path") or f"dataset={cfg.dataset._target_}"))
    split = cfg.pairs.get("from_split", "train")
    if bundle.pairs is None:
        check_from_split(split, bundle.pool, dataset=cfg.dataset._target_.rsplit(".", 2)[-2])
        sampled = cfg.pairs.get("max_new_tokens")  # sampled pairs: a prompt + a whole sampled solution must fit
        if uses_pairs and cfg.trainer.loss != "sft" and sampled is not None and cfg.trainer.max_length <= sampled:
            raise ValueError(f"trainer.max_length={cfg.trainer.max_length} <= pairs.max_new_tokens={sampled} "
                             "(eval's): no sampled pair fits with its prompt; raise trainer.max_length")
    elif uses_pairs:
        check_own_scores(bundle.pairs, scorer, reward=group_choice(cfg, "reward"))
        if getattr(scorer, "needs_answers", False) and (bad := [p for p in bundle.pairs if not p.answer]):
            where = bad[0].meta.get("where") or str(cfg.dataset.get("path") or cfg.dataset._target_)
            raise ValueError(f"{where}: field 'answer' is empty ({len(bad)} of {len(bundle.pairs)} pairs): "
                             f"{group_choice(cfg, 'reward')} scores a step by how often continuations reach "
                             "the reference answer; add answers or choose another reward")
        if getattr(scorer, "uses_labels", False):  # the pairs it keeps are known now: those with scores
            require_pairs(cfg, True, *score_pairs(bundle.pairs, scorer))
    return Run(cfg=cfg, out=out, rank=rank, world=world, resume=resume, model_spec=model_spec, lora_spec=lora_spec,
               scorer=scorer, engine=engine, pair_fn=pair_fn, bundle=bundle,
               eval_problems=bundle.eval[: cfg.eval.n] if cfg.eval.n is not None else bundle.eval,
               uses_pairs=uses_pairs, summary={"threads": torch.get_num_threads()})


def dry_run(s: Run) -> float:
    """reward.dry_run=true: print and write what judging would cost (calls after the cache, tokens, USD)."""
    from .data import write_json
    from .pairs import request_for

    src = s.bundle.pairs or []
    reqs = [request_for(p.question, p.prefix + side, p.answer, p.meta) for p in src for side in (p.chosen, p.rejected)]
    if not src:  # on-policy: k samples per problem, roughly gold-sized
        pcfg = s.cfg.pairs
        problems = s.bundle.pool if pcfg.get("from_split", "train") == "pool" else s.bundle.train
        k, n = pcfg.get("k", 1), pcfg.get("n_problems", len(s.bundle.train))
        gold = [p.steps for p in s.bundle.train] or [[]]  # answer-only pool problems: gold-sized guesses
        reqs = [request_for(p.question, p.steps or gold[i % len(gold)], p.answer, p.meta)
                for i, p in enumerate(problems[:n]) for _ in range(k)]
    est = s.scorer.estimate(reqs)
    print(json.dumps({"dry_run": est}, indent=2))
    write_json(s.out / "dry_run.json", est)
    return float("nan")


def open_tracker(s: Run) -> None:
    from .data import atomic_write_text
    from .tracking import NullTracker

    if s.rank == 0:
        atomic_write_text(s.out / "config_resolved.yaml", OmegaConf.to_yaml(s.cfg, resolve=True))
    s.tracker = (build(s.cfg.logger, "logger", out_dir=str(s.out), run_config=to_container(s.cfg),
                       resume_dir=str(s.resume.run_dir) if s.resume else None) if s.rank == 0 else NullTracker())


def load_model(s: Run):
    """The base model and its tokenizer (a tiny model is built from config)."""
    from .model import count_params, load_base

    model, tok = load_base(s.model_spec)
    s.summary.update(count_params(model))
    return model, tok


def preflight(s: Run, tok) -> None:
    """The dataset's own pairs, checked with the tokenizer before any SFT step or judge request: fields and
    token length vs trainer.max_length (dataset.truncation), the checks `finish_pairs` repeats per round."""
    from .pairs import score_pairs

    if not s.uses_pairs or s.bundle.pairs is None or (s.resume and s.resume.artifact("pairs.jsonl")):
        return
    pairs, report = validate(s.bundle.pairs, tok, s.cfg)
    if getattr(s.scorer, "uses_labels", False):  # costs nothing: labels only
        pairs, labels = score_pairs(pairs, s.scorer)
        report.update(labels)
    require_pairs(s.cfg, True, pairs, report)


def sft_warmup(s: Run, model, tok):
    """Full fine-tune on the gold solutions; or the resumed run's, or a cached one. Returns the model, its
    tokenizer and the path of the base the adapter goes on (saved as base_model when it exists only in memory)."""
    from . import checkpoint, distributed, sft_cache
    from .batching import encode_sft_all
    from .model import load_base
    from .train import train

    cfg, resume = s.cfg, s.resume
    cached = sft_cache.path(cfg, s.bundle.train)
    done = resume.artifact("base_model") if resume else None  # written once the warm-up finished
    # a parallel sweep job with the same warm-up waits for this one's and reuses it (not under torchrun:
    # its ranks train the warm-up together)
    with sft_cache.lock(cached if done is None and s.world == 1 else None):
        if done is not None:
            log.info("resume: the SFT warm-up finished in %s; reusing %s", resume.run_dir, done)
            model, tok = load_base(s.model_spec, path=str(done))
        elif sft_cache.is_ready(cached):  # same model, data, SFT config, seed
            log.info("sft: reusing the cached warm-up at %s", cached)
            model, tok = load_base(s.model_spec, path=str(cached))
            s.summary["sft_cached"] = str(cached)
        elif cfg.sft.max_steps > 0:
            t = time.perf_counter()
            sft_ex, dropped = encode_sft_all([(p.question, p.steps) for p in s.bundle.train if p.steps], tok,
                                             cfg.sft.max_length, where="sft.max_length")
            if dropped:
                s.summary["sft_dropped_too_long"] = dropped
            train(cfg.sft, model, tok, sft_ex, s.tracker, seed=cfg.seed, prefix="sft",
                  ckpt_dir=s.out / "checkpoints" / "sft", resume_from=resume.checkpoint("sft") if resume else None)
            s.summary["time/sft_s"] = time.perf_counter() - t
            if cached is not None and s.rank == 0:
                sft_cache.save(model, tok, cached)
    s.step += cfg.sft.max_steps
    base_path = s.model_spec.path
    if done is not None:
        base_path = str(done)
    elif cfg.sft.max_steps > 0 or base_path is None:  # the base exists only in memory: save it
        base_path = str(s.out / "base_model")
        if s.rank == 0:
            with checkpoint.atomic_dir(base_path) as tmp:  # its presence means "SFT done" to a resume
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        distributed.barrier()
    return model, tok, base_path


def attach_adapter(s: Run, model, tok, base_path: str):
    """(Re)load the base through bitsandbytes nf4 when lora.quant is set, add LoRA: (policy, reference, tok)."""
    import torch

    from . import generation
    from .model import add_lora, count_params, load_base

    if s.lora_spec.quant is not None:  # reload the weights through bitsandbytes nf4
        del model
        model, tok = load_base(s.model_spec, path=base_path, quant=s.lora_spec.quant)
    torch.manual_seed(s.cfg.seed)  # LoRA init must not depend on whether SFT ran in this process (resume)
    policy, ref = add_lora(model, s.lora_spec, gradient_checkpointing=s.cfg.trainer.gradient_checkpointing)
    s.summary.update({f"policy/{k}": v for k, v in count_params(policy).items()})
    if getattr(s.engine, "base_model", "") is None:  # vllm: serve the adapter on the base it was trained on
        s.engine.base_model = base_path
    generation.set_backend(s.engine)  # eval and on-policy sampling decode there from now on
    if hasattr(s.scorer, "bind"):  # reward=rollout samples step values from the policy being trained
        s.scorer.bind(policy, tok)
    return policy, ref, tok


def evaluate_before(s: Run, policy, tok) -> dict:
    """{"before": accuracy metrics} (the resumed run's if it has them), or {} with eval.before=false."""
    from .data import write_json

    before = s.resume.artifact("eval_before.json") if s.resume else None
    if before is not None:
        return {"before": json.loads(before.read_text())}
    if s.cfg.eval.before and s.rank == 0:
        m = evaluate_stage("before", policy, tok, s.eval_problems, s.cfg, s.tracker, s.step, s.out, s.scorer)
        write_json(s.out / "eval_before.json", m)
        return {"before": m}
    return {}


def build_pairs(s: Run, policy, tok, r: int = 0, at_step: int = 0) -> tuple[list, dict]:
    """Round `r`'s pairs on every rank, written to pairs.jsonl (round 0) or pairs_round<r>.jsonl: the
    dataset's own, or the `pairs` builder's from the current policy (seed + r); validated, then scored
    where unscored (`finish_pairs`). torchrun: rank 0 builds them, the others read the file. A resumed
    run reads the pairs it saved. No usable pair is an error naming the source and how to fix it."""
    from . import distributed
    from .data import StepPair, read_jsonl

    path = s.out / ("pairs.jsonl" if r == 0 else f"pairs_round{r}.jsonl")
    saved = s.resume.artifact(path.name) if s.resume else None  # scored + validated by the resumed run
    if saved is None:
        if s.rank == 0:
            if s.bundle.pairs is not None:
                pairs, report = list(s.bundle.pairs), {"source": "dataset"}
            else:
                pairs, report = built_pairs(s, policy, tok, r)
            before = s.scorer.summary() if hasattr(s.scorer, "summary") else None
            pairs, report = finish_pairs(pairs, report, s.scorer, tok, s.cfg, path)
            if before is not None:
                s.summary["judge"] = s.scorer.summary()  # the run's total so far (eval samples are scored too)
                spent = s.summary.setdefault("judge_pairs", {})  # what scoring the pairs alone cost, every round
                for k, v in cost_since(before, s.summary["judge"]).items():
                    spent[k] = round(spent.get(k, 0) + v, 3)
                s.tracker.log({f"judge/{k}": v for k, v in s.summary["judge"].items() if isinstance(v, (int, float))},
                              at_step)
        distributed.barrier()  # torchrun: rank 0 has written them
        if s.rank == 0:
            require_pairs(s.cfg, s.bundle.pairs is not None, pairs, report)
            return pairs, report
        saved = path
    pairs = [StepPair.from_dict(row) for _, row in read_jsonl(saved)]
    report = {"source": str(saved), "pairs": len(pairs)}
    require_pairs(s.cfg, s.bundle.pairs is not None, pairs, report)
    return pairs, report


def built_pairs(s: Run, policy, tok, r: int) -> tuple[list, dict]:
    """The `pairs` builder's pairs (unscored) and report from the current policy, seed + r; with `pairs_cache_dir`,
    those of an earlier run with the same inputs (stepdpo/pairs_cache.py), or built once here and kept there."""
    from . import pairs_cache
    from .pairs import call_builder

    seed = s.cfg.seed + r
    cached = pairs_cache.path(s.cfg, s.pair_fn, s.bundle.train, s.bundle.pool or (), policy, tok, seed)
    with pairs_cache.lock(cached):
        if pairs_cache.is_ready(cached):
            log.info("pairs: reusing the pairs built at %s", cached)
            s.summary.setdefault("pairs_cached", []).append(str(cached))
            return pairs_cache.load(cached)
        pairs, report = call_builder(s.pair_fn, s.bundle.train, pool=s.bundle.pool, model=policy, tokenizer=tok,
                                     scorer=s.scorer, seed=seed)
        if cached is not None:
            pairs_cache.save(cached, pairs, report)
        return pairs, report


def encode(s: Run, pairs: list | None, tok, report: dict | None = None) -> list:
    """Pairs -> token-weighted preference examples; trainer=sft: SFT examples (the gold solutions when
    `pairs` is None, else each distinct chosen solution once). With `report` (the first round's), log
    the token-weight histogram and the report."""
    from .batching import encode_pair, encode_sft_all

    cfg = s.cfg
    dropped = 0
    if pairs is None:
        examples, dropped = encode_sft_all([(p.question, p.steps) for p in s.bundle.train if p.steps], tok,
                                           cfg.trainer.max_length, where="trainer.max_length")
    elif cfg.trainer.loss == "sft":  # sft_data=chosen: each distinct correct solution once
        sols = {(p.question, tuple(p.prefix) + tuple(p.chosen)): None for p in pairs}
        examples, dropped = encode_sft_all(sols, tok, cfg.trainer.max_length, where="trainer.max_length")
    else:
        kwargs = OmegaConf.to_container(cfg.trainer.weighting_kwargs)
        examples = [encode_pair(p, tok, weighting=cfg.trainer.weighting, weighting_kwargs=kwargs,
                                max_length=cfg.trainer.max_length) for p in pairs]
    first_pairs = report is not None and pairs is not None and cfg.trainer.loss != "sft"  # the first round's pairs
    weights = [w for e in examples for w in (*e.chosen_w, *e.rejected_w)] if first_pairs else []
    if first_pairs and examples and not any(weights):
        raise ValueError(f"trainer.weighting={cfg.trainer.weighting}: every token weight of the {len(examples)} pairs "
                         f"is 0, so the preference loss has nothing to train on ({group_choice(cfg, 'reward')}; "
                         "weighting=advantage needs step values: reward=rollout)")
    if report is not None:
        if pairs is not None and cfg.trainer.loss == "sft":
            report["sft_examples"] = len(examples)
            if dropped:
                report["sft_dropped_too_long"] = dropped
        elif weights:
            s.tracker.log_histogram("pairs/token_weights", weights, s.step)
        log.info("pairs: %s", report)
    return examples


def report_validation(s: Run) -> float:
    """validate_only=true: validation.json holds the first round's report; stop before training."""
    from .data import write_json

    write_json(s.out / "validation.json", s.summary["pairs"])
    print(json.dumps({"validation": s.summary["pairs"]}, indent=2))
    return float("nan")


def preference_stage(s: Run, policy, ref, tok, examples: list) -> None:
    """The training loop on `examples` (trainer.loss=dpo: the token-weighted preference loss; sft: NLL);
    with trainer.rounds > 1 each later round's pairs come from `build_pairs` on the current policy."""
    from .train import train

    cfg, offset = s.cfg, s.step
    t = time.perf_counter()
    stage = "dpo" if cfg.trainer.loss != "sft" else "train_sft"

    def eval_fn(step: int) -> None:  # logged as eval/during/* (one series, not a key per step); samples_step<N>.jsonl
        evaluate_stage(f"step{step}", policy, tok, s.eval_problems, cfg, s.tracker, offset + step, s.out,
                       log_as="during")

    def refresh(r: int, at_step: int) -> list:  # trainer.rounds: round r's pairs, sampled from the current policy
        t_r = time.perf_counter()
        pairs, report = build_pairs(s, policy, tok, r, at_step)
        if s.rank == 0:
            report["seconds"] = time.perf_counter() - t_r
            log.info("pairs round %d (step %d): %s", r, at_step, report)
            s.summary.setdefault("pairs_rounds", []).append({"round": r, "step": at_step, **report})
            log_pair_report(s, report, at_step)
        return encode(s, pairs, tok)

    train(cfg.trainer, policy, tok, examples, s.tracker, ref_model=ref, seed=cfg.seed, prefix=stage,
          eval_fn=eval_fn if s.rank == 0 else None, step_offset=offset, ckpt_dir=s.out / "checkpoints" / stage,
          resume_from=s.resume.checkpoint(stage) if s.resume else None,
          refresh=refresh if cfg.trainer.rounds > 1 and s.uses_pairs else None)
    s.step += cfg.trainer.max_steps
    s.summary["time/train_s"] = time.perf_counter() - t


def finish(s: Run, policy, tok, base_path: str, results: dict, t_start: float, cpu_start: float) -> float:
    """Rank 0: save the adapter (+ how to load it), accuracy after, summary.json, the table, the plots."""
    from .data import write_json
    from .plots import plot_run

    cfg, out, summary = s.cfg, s.out, s.summary
    adapter_dir = out / ("adapter" if s.lora_spec.enabled else "model")
    policy.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    write_json(adapter_dir / "stepdpo.json", {"base_model": base_path, "lora": s.lora_spec.name,
                                               "load_in_4bit": s.lora_spec.quant is not None,
                                               "prompt_format": s.model_spec.prompt_format,
                                               "system_prompt": s.model_spec.system_prompt,
                                               "chat_template_kwargs": s.model_spec.format.template_kwargs})
    s.tracker.log_artifact(str(adapter_dir), name=f"adapter-{out.name}", type="model")
    results["after"] = evaluate_stage("after", policy, tok, s.eval_problems, cfg, s.tracker, s.step, out, s.scorer)
    summary["time/total_s"] = time.perf_counter() - t_start
    summary["time/cpu_s"] = time.process_time() - cpu_start  # all threads; ~ the wall time of threads=1 on an idle core
    summary["eval"] = results
    summary["gain"] = gain(results)  # W&B: gain/acc, gain/acc_se beside eval/before/acc, eval/after/acc(_se)
    if hasattr(s.scorer, "summary"):  # again: eval samples were scored too
        summary["judge"] = s.scorer.summary()
    write_json(out / "eval.json", results)
    write_json(out / "summary.json", {**s.tracker.summary_data, **summary})
    # the numeric pairs/* stay the last round's (history: every round at its step; summary.json "pairs": round 0)
    s.tracker.summary({k: v for k, v in _flat(summary).items()
                       if not (k.startswith("pairs/") and isinstance(v, (int, float)))})
    print_table(results, cfg.trainer, summary["time/total_s"], s.out, cpu_seconds=summary["time/cpu_s"])
    plot_run(out)  # training_curves.png, accuracy.png, histograms.png in the run dir
    return float(results["after"]["acc"])


# ----------------------------------------------------------------------------- helpers


def evaluate_stage(name, model, tokenizer, problems, cfg, tracker, step, out: Path, scorer=None,
                   log_as: str | None = None) -> dict:
    """Accuracy on `problems` (with its standard error, acc_se): samples_<name>.jsonl, metrics eval/<log_as or
    name>/* and eval/acc (one series over before, during and after), returned."""
    from .data import write_jsonl
    from .evaluate import math_accuracy, stop_from_config
    from .pairs import request_for

    t = time.perf_counter()
    e = cfg.eval
    metrics, records = math_accuracy(model, tokenizer, problems, max_new_tokens=e.max_new_tokens,
                                     batch_size=e.batch_size, maj_k=e.maj_k, temperature=e.temperature, seed=cfg.seed,
                                     stop=stop_from_config(e.stop))
    keep = records[: e.n_samples_saved]
    if scorer is not None and keep and not getattr(scorer, "uses_labels", False):
        for r, res in zip(keep, scorer.score([request_for(r["question"], r["steps"], r["gold"], r["meta"]) for r in keep])):
            r["step_scores"] = res.scores
    write_jsonl(out / f"samples_{name}.jsonl", keep)
    metrics["seconds"] = time.perf_counter() - t
    if "acc" in metrics and "n" in metrics:
        metrics["acc_se"] = acc_se(metrics)
    key = log_as or name
    tracker.log({**{f"eval/{key}/{k}": v for k, v in metrics.items()}, "eval/acc": metrics["acc"]}, step=step)
    tracker.log_table(f"samples/{key}", [{k: r.get(k) for k in ("question", "output", "pred", "gold", "correct", "step_scores")} for r in keep])
    log.info("eval %s: acc=%.4f (n=%d, %.1fs)", name, metrics["acc"], metrics["n"], metrics["seconds"])
    return metrics


def log_pair_report(s: Run, report: dict, step: int) -> None:
    """A round's pair report (counts, seconds) as pairs/* at the step its pairs were built."""
    s.tracker.log({f"pairs/{k}": v for k, v in report.items() if isinstance(v, (int, float))}, step)


def cost_since(before: dict, after: dict) -> dict:
    """The counts a scorer's summary() accumulates (requests, samples, seconds, tokens, cost), `after` - `before`."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return {k: v - before[k] for k, v in after.items() if k != "k" and num(v) and num(before.get(k))}


def finish_pairs(pairs, report: dict, scorer, tok, cfg, path: Path) -> tuple[list, dict]:
    """Validate built pairs (fields, token lengths: free), then score the unscored ones (may cost judge
    requests), and write them to `path` (atomically); extend `report`."""
    from .data import write_jsonl
    from .pairs import score_pairs

    pairs, val_report = validate(pairs, tok, cfg)
    report.update(val_report)
    pairs, score_report = score_pairs(pairs, scorer)
    report.update(score_report)
    report["pairs"] = len(pairs)
    if pairs:  # none: require_pairs stops the run, and no empty pairs.jsonl is left for a resume to take as done
        write_jsonl(path, (p.to_dict() for p in pairs))
    return pairs, report


def validate(pairs, tok, cfg):
    """Run the data validator (field checks, lengths) with the dataset's on_invalid policy."""
    from .validate import validate_pairs

    on_invalid = cfg.dataset.get("on_invalid", "error")
    return validate_pairs(pairs, tokenizer=tok, max_length=cfg.trainer.max_length, on_invalid=on_invalid,
                          truncation=cfg.dataset.get("truncation", "error"),
                          source=f"dataset={cfg.dataset._target_}")


def require_pairs(cfg: DictConfig, from_dataset: bool, pairs: list, report: dict) -> None:
    """No usable pair is an error (never a run that trains on nothing, or a validation that exits 0)."""
    if pairs:
        return
    from .pairs import no_pairs_message

    source = str(cfg.dataset.get("path") or f"dataset={cfg.dataset._target_}") if from_dataset else None
    raise ValueError(no_pairs_message(report, source=source, builder=group_choice(cfg, "pairs"),
                                      reward=group_choice(cfg, "reward")))


def group_choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (`reward=rule`), for messages; the target outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices[group]}"
    except (ValueError, KeyError, AttributeError):
        return f"{group}._target_={cfg[group]._target_}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out


def print_table(results: dict, tcfg, seconds: float, out: Path | None = None, cpu_seconds: float | None = None) -> None:
    name = "sft" if tcfg.loss == "sft" else f"{tcfg.loss}/{tcfg.weighting}"
    if tcfg.loss != "sft" and (tcfg.get("weighting_kwargs") or {}).get("error_span") == "token":
        name += ", one token"  # trainer=stepdpo_token
    print(format_table(results, name, seconds, out, cpu_seconds), flush=True)


def format_table(results: dict, name: str, seconds: float, out: Path | None = None,
                 cpu_seconds: float | None = None) -> str:
    """The run's last words: held-out accuracy before and after with n and its standard error
    sqrt(p(1-p)/n), the gain in points with the standard error of a difference of two independent
    proportions (the same problems are scored twice, so this is an upper bound), the wall time (and
    CPU time: on a shared machine, what threads=1 would take alone) and the run directory."""

    def se(m: dict) -> float:
        return 100 * acc_se(m)

    w = max(28, len(name) + 10)
    lines = ["", f"{'held-out accuracy':<{w}}{'%':>8}{'± s.e.':>9}{'n':>6}"]
    for stage, m in results.items():
        label = "before" if stage == "before" else f"after ({name})"
        lines.append(f"{label:<{w}}{100 * m['acc']:>8.1f}{se(m):>9.1f}{m['n']:>6}")
    g = gain(results)
    if g:
        lines.append(f"{'gain (points)':<{w}}{100 * g['acc']:>+8.1f}{100 * g['acc_se']:>9.1f}")
    lines.append(f"wall time {fmt_seconds(seconds)}" + (f", CPU time {cpu_seconds:.0f} s (all threads)"
                                                        if cpu_seconds is not None else ""))
    if out is not None:
        try:
            shown = Path(out).resolve().relative_to(Path.cwd())
        except ValueError:
            shown = Path(out).resolve()
        lines.append(f"run dir   {shown}  (eval.json, summary.json, samples_*.jsonl, *.png)")
    return "\n".join(lines)


def acc_se(m: dict) -> float:
    """Standard error of an accuracy over m["n"] problems: sqrt(p(1-p)/n)."""
    return math.sqrt(m["acc"] * (1 - m["acc"]) / max(1, m["n"]))


def gain(results: dict) -> dict:
    """{"acc": after - before, "acc_se": the standard error of a difference of two independent proportions (the same
    problems are scored twice, so an upper bound)}, or {} without both stages."""
    if "before" not in results or "after" not in results:
        return {}
    b, a = results["before"], results["after"]
    return {"acc": a["acc"] - b["acc"], "acc_se": math.hypot(acc_se(a), acc_se(b))}


def fmt_seconds(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s ({s:.0f} s)" if m else f"{s:.1f} s"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, out)
    except (ValueError, TypeError, FileNotFoundError) as e:
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper/launcher marks this job failed and the others run (SystemExit would end the sweep)
        # bad input: one clear line, no traceback wall (HYDRA_FULL_ERROR=1 shows it)
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        from .distributed import cleanup

        cleanup()  # torchrun: leave the process group


if __name__ == "__main__":
    main()
    from .distributed import exit_worker

    exit_worker()  # torchrun: end the worker without interpreter teardown (see its docstring)
