"""`reward=prm_model`: a local Hugging Face process reward model (PRM) scores every step.

Math-Shepherd style: the solution is written with a step tag after every step,

    text = prompt_template.format(question=q) + s_1 + step_tag + step_sep + s_2 + step_tag + ...

and the PRM, a causal LM, predicts at each tag position whether the step so far is good. The
score of step i is

    p_i = softmax([logit(positive_token), logit(negative_token)])[0]   at the tag after step i

Defaults follow peiyi9979/math-shepherd-mistral-7b-prm ("{question} " prompt, " ки" tag, "+"/"-").
The tag position is found from the tokenizer's character offsets (a fast tokenizer is
required), so the text is tokenized exactly as a whole, as in training. Only the two label
rows of the LM head are evaluated (hidden state @ W[[pos, neg]]), not the full vocabulary.

Runs batched under `torch.no_grad()`; nothing is downloaded when `local_files_only` is true.
A solution longer than `max_length` tokens fails (counted), it is never truncated silently.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from .base import ScoreRequest, ScoreResult

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_text(question: str, steps: Sequence[str], *, prompt_template: str, step_tag: str,
               step_sep: str) -> tuple[str, list[int]]:
    """(text, char index of the last character of each step's tag)."""
    text = prompt_template.format(question=question.strip())
    ends = []
    for i, s in enumerate(steps):
        text += str(s).strip() + step_tag
        ends.append(len(text) - 1)
        if i < len(steps) - 1:
            text += step_sep
    return text, ends


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int | None:
    """Index of the token whose character span covers `char` (special tokens have empty spans)."""
    for i, (s, e) in enumerate(offsets):
        if s <= char < e:
            return i
    return None


class PRMScorer:
    """A `StepScorer` from a local causal-LM PRM. Options are documented in conf/reward/prm_model.yaml."""

    name = "prm_model"

    def __init__(self, model_path: str, *, step_tag: str = " ки", positive_token: str = "+",
                 negative_token: str = "-", prompt_template: str = "{question} ", step_sep: str = "\n",
                 batch_size: int = 8, max_length: int = 2048, device: str = "auto", dtype: str = "auto",
                 local_files_only: bool = True, trust_remote_code: bool = False):
        import torch  # late imports: only this option needs torch/transformers at build time
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not model_path or not isinstance(model_path, (str, os.PathLike)):
            raise ValueError(f"reward.model_path: must be a model directory (or hub id), got {model_path!r}")
        model_path = os.path.expanduser(str(model_path))
        if local_files_only and not os.path.isdir(model_path):
            raise ValueError(f"reward.model_path: {model_path!r} is not a directory and reward.local_files_only=true "
                             "(download the PRM first, or set local_files_only=false)")
        if not step_tag:
            raise ValueError("reward.step_tag: must be a non-empty string (e.g. ' ки')")
        if "{question}" not in prompt_template:
            raise ValueError(f"reward.prompt_template: must contain '{{question}}', got {prompt_template!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward.batch_size: must be an integer >= 1, got {batch_size!r}")
        if dtype not in DTYPES:
            raise ValueError(f"reward.dtype: {dtype!r} is not one of {DTYPES}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_path = model_path
        self.step_tag, self.step_sep, self.prompt_template = step_tag, step_sep, prompt_template
        self.batch_size, self.max_length, self.device = batch_size, int(max_length), torch.device(device)
        self.provenance = f"prm_model:{os.path.basename(model_path.rstrip('/')) or model_path}"

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local_files_only,
                                                       trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"reward.model_path: {model_path} has no fast tokenizer (tokenizer.json); "
                             "the PRM scorer needs character offsets to find the step tags")
        kw: dict[str, Any] = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        if dtype != "auto":
            kw["dtype"] = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kw).to(self.device).eval()
        self.pos_id = self._token_id(positive_token, "positive_token")
        self.neg_id = self._token_id(negative_token, "negative_token")
        if self.pos_id == self.neg_id:
            raise ValueError(f"reward.positive_token/negative_token: both map to token id {self.pos_id}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def __repr__(self) -> str:
        return f"PRMScorer({self.model_path!r}, tag={self.step_tag!r}, device={self.device})"

    def _token_id(self, token: str, key: str) -> int:
        tok = self.tokenizer
        vocab = tok.get_vocab()
        if token in vocab:
            return vocab[token]
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"reward.{key}: {token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
        return ids[0]

    # ------------------------------------------------------------------ scoring
    def _encode(self, req: ScoreRequest) -> tuple[list[int], list[int]] | str:
        """(input ids, token index of each step tag), or an error reason."""
        text, ends = build_text(req.question, req.steps, prompt_template=self.prompt_template,
                                step_tag=self.step_tag, step_sep=self.step_sep)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) > self.max_length:
            return f"too_long: {len(ids)} tokens > reward.max_length={self.max_length}"
        pos = []
        for i, c in enumerate(ends):
            t = token_at(offsets, c)
            if t is None:
                return f"no_tag_token: the tag after step {i + 1} maps to no token"
            pos.append(t)
        return ids, pos

    def _label_logits(self, input_ids, attention_mask, rows, cols):
        """(N, 2) logits of [positive, negative] at (rows, cols) positions."""
        import torch

        model = self.model
        head = model.get_output_embeddings()
        base = getattr(model, "base_model", None)
        plain = (isinstance(head, torch.nn.Linear) and base is not None and base is not model
                 and getattr(model.config, "final_logit_softcapping", None) is None
                 and getattr(model.config, "logit_scale", None) is None)
        label_ids = torch.tensor([self.pos_id, self.neg_id], device=self.device)
        if plain:  # only the two label rows of the head: (N, H) @ (H, 2)
            h = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            h = h[rows, cols]  # (N, H)
            w = head.weight[label_ids]  # (2, H)
            out = h.to(w.dtype) @ w.T
            if head.bias is not None:
                out = out + head.bias[label_ids]
            return out.float()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return logits[rows, cols][:, label_ids].float()

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        import torch

        results: list[ScoreResult | None] = [None] * len(requests)
        todo: list[tuple[int, list[int], list[int]]] = []
        for i, r in enumerate(requests):
            if not isinstance(r, ScoreRequest):
                raise TypeError(f"prm_model: requests[{i}] must be a ScoreRequest, got {type(r).__name__}")
            if not r.steps:
                results[i] = ScoreResult([], self.provenance)
                continue
            enc = self._encode(r)
            if isinstance(enc, str):
                label = dict(r.meta).get("problem_id") or f"request {i}"
                results[i] = ScoreResult(None, self.provenance, error=f"{label}: {enc}")
                continue
            todo.append((i, *enc))
        todo.sort(key=lambda t: -len(t[1]))  # similar lengths per batch: less padding
        with torch.no_grad():
            for b in range(0, len(todo), self.batch_size):
                chunk = todo[b:b + self.batch_size]
                T = max(len(ids) for _, ids, _ in chunk)
                input_ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)  # (B, T), right-padded
                mask = torch.zeros((len(chunk), T), dtype=torch.long)  # (B, T)
                rows, cols = [], []
                for j, (_, ids, pos) in enumerate(chunk):
                    input_ids[j, :len(ids)] = torch.tensor(ids)
                    mask[j, :len(ids)] = 1
                    rows += [j] * len(pos)
                    cols += pos
                lg = self._label_logits(input_ids.to(self.device), mask.to(self.device),
                                        torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
                p_pos = torch.softmax(lg, dim=-1)[:, 0].cpu().tolist()  # (N,) one per step tag
                k = 0
                for i, _, pos in chunk:
                    scores = [float(min(1.0, max(0.0, s))) for s in p_pos[k:k + len(pos)]]
                    k += len(pos)
                    results[i] = ScoreResult(scores, self.provenance)
        assert all(r is not None for r in results)  # every request got a result above
        return results  # type: ignore[return-value]
