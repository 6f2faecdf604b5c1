"""`python -m stepdpo.run`: the one entrypoint. Builds the pieces from config, runs the stages.

    dataset -> [SFT warm-up] -> eval before -> pairs -> step scores -> token weights
            -> preference training (LoRA) -> eval after -> adapter + reports in the run dir

Returns the held-out accuracy after training (the sweep metric, e.g. for Optuna).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import build, register_configs, to_container, validate_targets

log = logging.getLogger("stepdpo")
register_configs()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate_stage(name, model, tokenizer, problems, cfg, tracker, step, out: Path, scorer=None) -> dict:
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
    tracker.log({f"eval/{name}/{k}": v for k, v in metrics.items()}, step=step)
    tracker.log_table(f"samples/{name}", [{k: r.get(k) for k in ("question", "output", "pred", "gold", "correct", "step_scores")} for r in keep])
    log.info("eval %s: acc=%.4f (n=%d, %.1fs)", name, metrics["acc"], metrics["n"], metrics["seconds"])
    return metrics


def run(cfg: DictConfig, out: Path) -> float:
    import torch

    from .batching import encode_pair, encode_sft
    from .data import StepPair, atomic_write_text, read_jsonl, write_json
    from .model import add_lora, count_params, load_base
    from .pairs import check_reject, check_resample, request_for
    from .train import train
    from . import checkpoint, distributed

    t_start = time.perf_counter()
    validate_targets(cfg)  # every key of every group, before anything is loaded
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)  # before any tensor work; also for jobs a sweep runs in-process
    seed_everything(cfg.seed)
    rank, world = distributed.init()  # torchrun: DDP over `world` processes; rank 0 logs, evaluates, writes
    if world > 1:
        out = Path(distributed.broadcast(str(out)))  # ranks' clocks may name different run dirs: use rank 0's
    resume = checkpoint.resolve_resume(cfg.trainer.resume, out)  # None, or where to continue from
    model_spec = build(cfg.model, "model")
    lora_spec = build(cfg.lora, "lora")
    if lora_spec.load_in_4bit and model_spec.path is None:
        for key in ("hidden_size", "intermediate_size"):
            if model_spec.tiny.get(key, 64) % 64:
                raise ValueError(f"model.tiny.{key}={model_spec.tiny[key]}: lora=qlora quantizes in blocks of 64 "
                                 "input features; use a multiple of 64")
    scorer = build(cfg.reward, "reward")
    pair_fn = build(cfg.pairs, "pairs")
    bundle = build(cfg.dataset, "dataset")
    log.info("dataset %s: %d train / %d eval problems%s", bundle.name, len(bundle.train), len(bundle.eval),
             f", {len(bundle.pairs)} pairs" if bundle.pairs is not None else "")
    eval_problems = bundle.eval[: cfg.eval.n] if cfg.eval.n is not None else bundle.eval
    uses_pairs = cfg.trainer.loss != "sft" or cfg.trainer.sft_data == "chosen"  # sft_data=chosen: SFT on chosen sides
    if cfg.trainer.rounds > 1 and uses_pairs and bundle.pairs is not None:
        raise ValueError(f"trainer.rounds={cfg.trainer.rounds}: rounds re-build pairs from the current policy, "
                         f"but dataset={cfg.dataset._target_} brings its own pairs; set trainer.rounds=1")
    # validate_only=true builds and checks the first round's pairs (later rounds need training): rounds are ignored

    pair_split = cfg.pairs.get("from_split", "train")
    if pair_split not in ("train", "pool"):
        raise ValueError(f"pairs.from_split={pair_split!r}: choose train (the SFT problems) or pool (answer-only)")
    check_reject(cfg.pairs.get("reject", "process"))
    check_resample(cfg.pairs.get("resample_k", 0), cfg.pairs.get("resample_temperature", 0.7))
    if pair_split == "pool" and not bundle.pool and bundle.pairs is None:
        raise ValueError(f"pairs.from_split=pool, but dataset={cfg.dataset._target_.rsplit('.', 2)[-2]} has no "
                         "answer-only pool problems: set dataset.n_pool (arith, gsm8k) or pairs.from_split=train")
    pair_problems = bundle.pool if pair_split == "pool" else bundle.train
    pair_kw = {"topup_problems": bundle.train} if pair_split == "pool" else {}

    if getattr(scorer, "dry_run", False):  # reward.dry_run=true: say what judging would cost, then stop
        src = bundle.pairs or []
        reqs = [request_for(p.question, p.prefix + side, p.answer, p.meta) for p in src for side in (p.chosen, p.rejected)]
        if not src:  # on-policy: k samples per problem, roughly gold-sized
            k, n = cfg.pairs.get("k", 1), cfg.pairs.get("n_problems", len(bundle.train))
            gold = [p.steps for p in bundle.train] or [[]]  # answer-only pool problems: gold-sized guesses
            reqs = [request_for(p.question, p.steps or gold[i % len(gold)], p.answer, p.meta)
                    for i, p in enumerate(pair_problems[:n]) for _ in range(k)]
        est = scorer.estimate(reqs)
        print(json.dumps({"dry_run": est}, indent=2))
        write_json(out / "dry_run.json", est)
        return float("nan")

    if rank == 0:
        atomic_write_text(out / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    tracker = (build(cfg.logger, "logger", out_dir=str(out), run_config=to_container(cfg)) if rank == 0
               else distributed.NullTracker())
    summary: dict = {"threads": torch.get_num_threads()}
    try:
        model, tok = load_base(model_spec)
        summary.update(count_params(model))
        step = 0
        # ---------------------------------------------------------------- SFT warm-up (full fine-tune)
        cached = sft_cache_path(cfg, bundle.train)
        done = resume.artifact("base_model") if resume else None  # written once the warm-up finished
        # a parallel sweep job with the same warm-up waits for this one's and reuses it (not under torchrun:
        # its ranks train the warm-up together)
        lock = sft_lock_path(cached) if cached and done is None and distributed.world_size() == 1 else None
        with checkpoint.exclusive_lock(lock, "SFT warm-up") if lock else contextlib.nullcontext():
            if done is not None:
                log.info("resume: the SFT warm-up finished in %s; reusing %s", resume.run_dir, done)
                model, tok = load_base(model_spec, path=str(done))
            elif cached is not None and (cached / "config.json").exists():  # same model, data, SFT config, seed
                log.info("sft: reusing the cached warm-up at %s", cached)
                model, tok = load_base(model_spec, path=str(cached))
                summary["sft_cached"] = str(cached)
            elif cfg.sft.max_steps > 0:
                t = time.perf_counter()
                sft_ex = [encode_sft(p.question, p.steps, tok) for p in bundle.train if p.steps]
                train(cfg.sft, model, tok, sft_ex, tracker, seed=cfg.seed, prefix="sft", ckpt_dir=out / "checkpoints" / "sft",
                      resume_from=resume.checkpoint("sft") if resume else None)
                summary["time/sft_s"] = time.perf_counter() - t
                if cached is not None and rank == 0:
                    save_atomic_dir(model, tok, cached)
        step += cfg.sft.max_steps
        base_path = model_spec.path
        if done is not None:
            base_path = str(done)
        elif cfg.sft.max_steps > 0 or base_path is None:  # the base exists only in memory: save it
            base_path = str(out / "base_model")
            if rank == 0:
                with checkpoint.atomic_dir(base_path) as tmp:  # its presence means "SFT done" to a resume
                    model.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
            distributed.barrier()
        if lora_spec.load_in_4bit:  # reload the weights through bitsandbytes nf4
            del model
            model, tok = load_base(model_spec, path=base_path, quant=lora_spec)
        torch.manual_seed(cfg.seed)  # LoRA init must not depend on whether SFT ran in this process (resume)
        policy, ref = add_lora(model, lora_spec, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
        if hasattr(scorer, "bind"):  # reward=rollout samples step values from the policy being trained
            scorer.bind(policy, tok)
        summary.update({f"policy/{k}": v for k, v in count_params(policy).items()})

        results = {}
        before = resume.artifact("eval_before.json") if resume else None
        if before is not None:
            results["before"] = json.loads(before.read_text())
        elif cfg.eval.before and rank == 0:
            results["before"] = evaluate_stage("before", policy, tok, eval_problems, cfg, tracker, step, out, scorer)
            write_json(out / "eval_before.json", results["before"])

        # ---------------------------------------------------------------- pairs and step scores
        t = time.perf_counter()
        def encode(pairs):
            if cfg.trainer.loss == "sft":  # sft_data=chosen: each distinct correct solution once
                sols = {(p.question, tuple(p.prefix) + tuple(p.chosen)): None for p in pairs}
                return [encode_sft(q, list(steps), tok) for q, steps in sols]
            return [encode_pair(p, tok, weighting=cfg.trainer.weighting,
                                weighting_kwargs=OmegaConf.to_container(cfg.trainer.weighting_kwargs),
                                max_length=cfg.trainer.max_length) for p in pairs]

        if not uses_pairs:
            examples = [encode_sft(p.question, p.steps, tok) for p in bundle.train if p.steps]
            pair_report: dict = {"pairs": 0}
        else:
            saved = resume.artifact("pairs.jsonl") if resume else None  # scored + validated by the resumed run
            if saved is None and rank > 0:
                distributed.barrier()  # torchrun: rank 0 builds the pairs, the others read them
                saved = out / "pairs.jsonl"
            if saved is not None:
                pairs = [StepPair.from_dict(row) for _, row in read_jsonl(saved)]
                pair_report = {"source": str(saved), "pairs": len(pairs)}
            elif bundle.pairs is not None:
                pairs, pair_report = list(bundle.pairs), {"source": "dataset"}
            else:
                res = pair_fn(problems=pair_problems, model=policy, tokenizer=tok, scorer=scorer, seed=cfg.seed, **pair_kw)
                pairs, pair_report = res if isinstance(res, tuple) else (res, {})
            if saved is None:
                pairs, pair_report = finish_pairs(pairs, pair_report, scorer, tok, cfg, out / "pairs.jsonl")
                if world > 1:
                    distributed.barrier()
                if hasattr(scorer, "summary"):
                    summary["judge"] = scorer.summary()
                    tracker.log({f"judge/{k}": v for k, v in summary["judge"].items() if isinstance(v, (int, float))}, step)
            examples = encode(pairs)
            if cfg.trainer.loss == "sft":
                pair_report["sft_examples"] = len(examples)
            elif weights := [w for e in examples for w in e.chosen_w + e.rejected_w]:
                tracker.log_histogram("pairs/token_weights", weights, step)
        summary["pairs"] = pair_report
        summary["time/pairs_s"] = time.perf_counter() - t
        log.info("pairs: %s", pair_report)
        if cfg.validate_only:
            write_json(out / "validation.json", pair_report)
            print(json.dumps({"validation": pair_report}, indent=2))
            return float("nan")

        # ---------------------------------------------------------------- preference (or SFT) training
        t = time.perf_counter()
        eval_fn = (lambda s: {f"eval/during/{k}": v for k, v in evaluate_stage(
            f"step{s}", policy, tok, eval_problems, cfg, tracker, step + s, out).items()})
        stage = "dpo" if cfg.trainer.loss != "sft" else "train_sft"

        def refresh(r: int, at_step: int):  # trainer.rounds: round r's pairs, sampled from the current policy
            path = out / f"pairs_round{r}.jsonl"
            if rank == 0:
                t_r = time.perf_counter()
                res = pair_fn(problems=pair_problems, model=policy, tokenizer=tok, scorer=scorer, seed=cfg.seed + r,
                              **pair_kw)
                new, report = res if isinstance(res, tuple) else (res, {})
                new, report = finish_pairs(new, report, scorer, tok, cfg, path)
                report["seconds"] = time.perf_counter() - t_r
                log.info("pairs round %d (step %d): %s", r, at_step, report)
                summary.setdefault("pairs_rounds", []).append({"round": r, "step": at_step, **report})
                tracker.log({f"pairs/{k}": v for k, v in report.items() if isinstance(v, (int, float))}, at_step)
            distributed.barrier()
            if rank > 0:
                new = [StepPair.from_dict(row) for _, row in read_jsonl(path)]
            return encode(new)

        train(cfg.trainer, policy, tok, examples, tracker, ref_model=ref, seed=cfg.seed, prefix=stage,
              eval_fn=eval_fn if rank == 0 else None, step_offset=step, ckpt_dir=out / "checkpoints" / stage,
              resume_from=resume.checkpoint(stage) if resume else None,
              refresh=refresh if cfg.trainer.rounds > 1 and uses_pairs else None)
        step += cfg.trainer.max_steps
        if rank > 0:  # rank 0 saves the adapter and evaluates
            return float("nan")
        summary["time/train_s"] = time.perf_counter() - t
        adapter_dir = out / ("adapter" if lora_spec.enabled else "model")
        policy.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        write_json(adapter_dir / "stepdpo.json", {"base_model": base_path, "lora": lora_spec.name,
                                                   "load_in_4bit": lora_spec.load_in_4bit,
                                                   "prompt_format": model_spec.prompt_format,
                                                   "system_prompt": model_spec.system_prompt})
        tracker.log_artifact(str(adapter_dir), name=f"adapter-{out.name}", type="model")
        results["after"] = evaluate_stage("after", policy, tok, eval_problems, cfg, tracker, step, out, scorer)
        summary["time/total_s"] = time.perf_counter() - t_start
        summary["eval"] = results
        if hasattr(scorer, "summary"):  # again: eval samples were scored too
            summary["judge"] = scorer.summary()
        write_json(out / "eval.json", results)
        write_json(out / "summary.json", {**tracker.summary_data, **summary})
        tracker.summary({k: v for k, v in _flat(summary).items()})
        print_table(results, cfg.trainer, summary["time/total_s"])
        from .plots import plot_run

        plot_run(out)  # training_curves.png, accuracy.png, histograms.png in the run dir
        return float(results["after"]["acc"])
    finally:
        tracker.close()
        if hasattr(scorer, "close"):
            scorer.close()


SFT_KEY_IGNORES = ("sft_data", "log_every", "eval_every", "save_every", "keep_checkpoints", "resume", "rounds", "ref_update",
                   "precompute_ref", "ref_cache_dir")


def sft_cache_path(cfg: DictConfig, train: list) -> Path | None:
    """`sft_cache_dir/<hash>` of everything the warm-up depends on (model, data, SFT config, seed),
    so the jobs of a sweep that differ only after the warm-up share one SFT run. The key hashes the
    config and `train` (the problems the warm-up trains on: their questions and gold steps), so a
    warm-up is never reused for other data under the same config (a generator fix, an edited file)."""
    if not cfg.sft_cache_dir or cfg.sft.max_steps == 0:
        return None
    import hashlib

    key = {k: to_container(cfg[k]) for k in ("model", "dataset", "sft")}
    data = json.dumps([[p.question, p.steps] for p in train if p.steps]).encode()
    key["data_sha256"] = hashlib.sha256(data).hexdigest()
    key["dataset"].pop("n_pool", None)  # answer-only problems, drawn after train: the warm-up never sees them
    for k in SFT_KEY_IGNORES:  # how the warm-up is logged, saved or resumed doesn't change its weights
        key["sft"].pop(k, None)
    key["seed"] = cfg.seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.sft_cache_dir).expanduser() / digest


def sft_lock_path(cached: Path) -> Path:
    """The flock that parallel jobs needing the warm-up `cached` share: hidden, beside it in the cache."""
    return cached.parent / f".{cached.name}.lock"


def save_atomic_dir(model, tok, dest: Path) -> None:
    """save_pretrained into a temp dir beside `dest`, then rename: parallel jobs never see half a model."""
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(dest)
    except OSError:  # another job got there first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def finish_pairs(pairs, report: dict, scorer, tok, cfg, path: Path) -> tuple[list, dict]:
    """Score (where unscored), validate and write built pairs to `path` (atomically); extend `report`."""
    from .data import write_jsonl
    from .pairs import score_pairs

    pairs, score_report = score_pairs(pairs, scorer)
    report.update(score_report)
    pairs, val_report = validate(pairs, tok, cfg)
    report.update(val_report)
    report["pairs"] = len(pairs)
    write_jsonl(path, (p.to_dict() for p in pairs))
    return pairs, report


def validate(pairs, tok, cfg):
    """Run the data validator (field checks, lengths) with the dataset's on_invalid policy."""
    from .validate import validate_pairs

    on_invalid = cfg.dataset.get("on_invalid", "error")
    return validate_pairs(pairs, tokenizer=tok, max_length=cfg.trainer.max_length, on_invalid=on_invalid,
                          truncation=cfg.dataset.get("truncation", "error"),
                          source=f"dataset={cfg.dataset._target_}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out


def print_table(results: dict, tcfg, seconds: float) -> None:
    name = "sft" if tcfg.loss == "sft" else f"{tcfg.loss}/{tcfg.weighting}"
    lines = ["", f"{'stage':<24}{'accuracy':>10}{'n':>6}"]
    for stage, m in results.items():
        label = "before" if stage == "before" else f"after ({name})"
        lines.append(f"{label:<24}{m['acc']:>10.4f}{m['n']:>6}")
    lines.append(f"total time {seconds:.1f}s")
    print("\n".join(lines), flush=True)


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
