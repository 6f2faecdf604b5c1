"""Plain dataclasses that flow through the pipeline, and JSONL I/O with located errors.

Problem  -> a math problem with its gold solution split into steps.
StepPair -> a preference pair: prompt, shared prefix steps, chosen and rejected continuations,
            and (after scoring) one score in [0, 1] per continuation step.

Text layout seen by the model (see `prompt_text` / `response_text`):

    prompt   = format_prompt(question, tokenizer) + joined prefix steps, each followed by its separator
    response = the joined steps            (+ the end-of-turn token: `end_of_response_id`)

Steps are joined by "\n", except that a step which already ends with a line break carries its
own separator: gold steps (stripped) read "step1\nstep2", while steps split from a sampled
solution (`steps.split_steps`) keep the text between them ("...= 24.\n\n", "Then ...") and join
back to the sampled text byte for byte, so the tokens trained are the tokens the policy wrote.
Response and prefix text is encoded with `encode_text` (special-token strings in it stay text).

`format_prompt` is "Question: ...\nAnswer:\n" (model.prompt_format=plain), or the tokenizer's own
chat template with an optional system message and the generation prompt (model.prompt_format=chat,
for instruct models). The format travels with the tokenizer (`set_prompt_format`), so every place
that tokenizes a prompt (training, pair sampling, evaluation, generation) uses the same one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

STEP_SEP = "\n"
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


PROMPT_FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the prompt text (the `model` group's prompt_format and system_prompt)."""

    style: str = "plain"  # plain | chat
    system: str | None = None  # chat only: the system message (None = none)
    template_kwargs: dict = field(default_factory=dict, hash=False, compare=True)  # chat only: extra variables for
    # apply_chat_template (enable_thinking=False for Qwen3; date_string pins Llama-3.2's "Today Date")

    def __post_init__(self):
        if self.style not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format: unknown {self.style!r}; choose one of {PROMPT_FORMATS}")
        if self.system and self.style != "chat":
            raise ValueError("model.system_prompt is set but model.prompt_format=plain ignores it; "
                             "use model.prompt_format=chat or model.system_prompt=null")


def set_prompt_format(tokenizer, fmt: PromptFormat):
    """Attach `fmt` to `tokenizer` (checked: chat needs the tokenizer to carry a chat template)."""
    if fmt.style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.prompt_format=chat: this tokenizer has no chat_template (base models usually "
                         "don't); use model.prompt_format=plain, or set one in the model's tokenizer_config.json")
    tokenizer.stepdpo_prompt_format = fmt
    tokenizer.stepdpo_end_id = None  # end_of_response_id depends on the format
    return tokenizer


def prompt_format_of(tokenizer) -> PromptFormat:
    return getattr(tokenizer, "stepdpo_prompt_format", None) or PromptFormat()


def format_prompt(question: str, tokenizer=None) -> str:
    """The prompt text for `question` in `tokenizer`'s prompt format (plain when it has none)."""
    fmt = prompt_format_of(tokenizer)
    if fmt.style == "plain":
        return PROMPT_TEMPLATE.format(question=question.strip())
    messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [
        {"role": "user", "content": question.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **fmt.template_kwargs)


_SENTINEL = "@@STEPDPO-SENTINEL-7f3a@@"  # stands in for a message to find where the template puts it


def end_of_response_id(tokenizer) -> int:
    """The token that ends a response in training: the chat template's end of an assistant turn
    (what `apply_chat_template` writes right after an assistant message: `<|im_end|>` for Qwen,
    `<|eot_id|>` for Llama-3, even where `eos_token` is `<|end_of_text|>`), or `eos_token` in the
    plain format, or when the template writes no special token there. Cached on the tokenizer."""
    cached = getattr(tokenizer, "stepdpo_end_id", None)
    if cached is not None:
        return cached
    end = tokenizer.eos_token_id
    fmt = prompt_format_of(tokenizer)
    if fmt.style == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}],
                                             tokenize=False, **fmt.template_kwargs)
        at = text.rfind(_SENTINEL)
        if at >= 0:
            tail = tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
            if tail and tail[0] in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
                end = tail[0]
    if end is None:
        raise ValueError("tokenizer: no eos_token and no end-of-turn token in the chat template; set eos_token in "
                         "the model's tokenizer_config.json")
    tokenizer.stepdpo_end_id = end
    return end


def encode_text(tokenizer, text: str, **kw):
    """Tokenize model-written text (steps, responses): no BOS/EOS added, and a special token's string
    in it ("<|im_end|>" written out) stays text, as the policy sampled it, never that special token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, **kw)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: BOS (if the tokenizer has one) + text, with exactly one BOS even when
    a chat template already writes it into the text."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # final answer as text ("52", "\\frac{1}{2}")
    steps: list[str]  # gold solution, one reasoning step per entry (may be empty if unknown)
    meta: dict[str, Any] = field(default_factory=dict)  # dataset-specific (level, subject, ops...)

    @property
    def solution(self) -> str:
        return response_text(self.steps)


@dataclass
class StepPair:
    id: str
    question: str
    answer: str
    prefix: list[str]  # shared steps before the divergence (context, weight 0)
    chosen: list[str]  # chosen continuation steps
    rejected: list[str]  # rejected continuation steps
    chosen_scores: list[float] | None = None  # one per chosen step, in [0, 1]
    rejected_scores: list[float] | None = None  # one per rejected step, in [0, 1]
    source: str = ""  # how the pair was built: on_policy, perturb, prm800k, file...
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return prompt_text(self.question, self.prefix)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepPair":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def separator_after(step: str, last: bool = False) -> str:
    """What follows `step` in the model's text: nothing after the last step or after a step that
    ends with its own line break (split from sampled text), else STEP_SEP."""
    return "" if last or step.endswith("\n") else STEP_SEP


def prefix_text(prefix: list[str] | tuple[str, ...]) -> str:
    """The prefix steps as they sit in the prompt: each followed by its separator."""
    return "".join(s + separator_after(s) for s in prefix)


def prompt_text(question: str, prefix: list[str] | tuple[str, ...] = (), tokenizer=None) -> str:
    return format_prompt(question, tokenizer) + prefix_text(prefix)


def prefix_tokens(tokenizer, prefix: list[str] | tuple[str, ...]) -> int:
    """How many tokens of a solution its prefix steps are, encoded as training encodes them (`pair_prompt_ids`);
    0 without a tokenizer (a stub generate function in tests)."""
    return len(encode_text(tokenizer, prefix_text(prefix))["input_ids"]) if prefix and tokenizer is not None else 0


def continuation_fits(completion, used: int, max_new_tokens: int) -> bool:
    """The length rule for a continuation sampled after `used` tokens of prefix steps: prefix + continuation must
    be a whole solution that ends within `max_new_tokens` (eval's limit, which every sample of a solution obeys),
    its end-of-sequence token included. A continuation its generate call cut off ("length") never fits. With
    used = 0 this is exactly "not cut off"."""
    return completion.finish_reason != "length" and used + len(completion.token_ids) < max_new_tokens


def pair_prompt_ids(tokenizer, question: str, prefix: list[str] | tuple[str, ...] = ()) -> tuple[list[int], int]:
    """(ids of `prompt_text(question, prefix)`, how many of them are the prefix steps): the template
    part through `prompt_ids`, the model-written prefix through `encode_text`. The cut sits after the
    template's last line break (or special token), where byte-level BPE never merges across."""
    head = prompt_ids(tokenizer, format_prompt(question, tokenizer))
    tail = list(encode_text(tokenizer, prefix_text(prefix))["input_ids"]) if prefix else []
    return head + tail, len(tail)


def truncated_prompt_ids(tokenizer, question: str, prefix: list[str] | tuple[str, ...],
                         max_tokens: int) -> tuple[list[int], int, int]:
    """`pair_prompt_ids` cut to at most `max_tokens` by dropping the question's oldest tokens
    (dataset.truncation=truncate_left): the BOS, the system message, the template's user/assistant
    header and the prefix steps are kept whole. Returns (ids, n_prefix, question tokens dropped);
    raises ValueError when even an empty question would not fit."""
    ids, n_prefix = pair_prompt_ids(tokenizer, question, prefix)
    if len(ids) <= max_tokens:
        return ids, n_prefix, 0
    q = question.strip()
    text = format_prompt(_SENTINEL, tokenizer)
    at = text.find(_SENTINEL)
    if at < 0:
        raise ValueError("dataset.truncation=truncate_left: can't find the question in the prompt template")
    head = prompt_ids(tokenizer, text[:at])
    q_ids = list(tokenizer(q, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"])
    pre = ids[len(ids) - n_prefix:] if n_prefix else []
    keep = max_tokens - len(head) - len(tail) - len(pre)
    if keep <= 0:
        raise ValueError(f"dataset.truncation=truncate_left: the prompt without its question is {max_tokens - keep} "
                         f"tokens (template header {len(head) + len(tail)}, prefix steps {len(pre)}) and the budget "
                         f"is {max_tokens}; raise trainer.max_length or use dataset.truncation=drop")
    cut = len(q_ids) - keep
    return head + q_ids[cut:] + tail + pre, n_prefix, cut


def response_text(steps: list[str] | tuple[str, ...]) -> str:
    return "".join(s + separator_after(s, i == len(steps) - 1) for i, s in enumerate(steps))


def step_spans(steps: list[str]) -> list[tuple[int, int]]:
    """Character span of each step in `response_text(steps)`.

    Step i covers [start_i, start_{i+1}): the separator after a step belongs to that step, so
    every character of the response lies in exactly one step. An empty step has an empty span.
    """
    spans, pos = [], 0
    for i, s in enumerate(steps):
        end = pos + len(s) + len(separator_after(s, i == len(steps) - 1))
        spans.append((pos, end))
        pos = end
    return spans


# ----------------------------------------------------------------------------- JSONL I/O


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, row). Blank lines are skipped; bad JSON names file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (check the dataset path in your config)")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory and rename: never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_field(row: dict, key: str, typ: type | tuple[type, ...], where: str, *, nonempty: bool = True) -> Any:
    """Return row[key], or raise ValueError naming `where` (file:line), the field and the fix."""
    if key not in row:
        raise ValueError(f"{where}: field '{key}' missing (keys: {sorted(row)})")
    v = row[key]
    if not isinstance(v, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ValueError(f"{where}: field '{key}' must be {names}, got {type(v).__name__}")
    if nonempty and isinstance(v, (str, list)) and not (v.strip() if isinstance(v, str) else v):
        raise ValueError(f"{where}: field '{key}' must be non-empty")
    return v


def check_scores(scores: Any, n_steps: int, where: str, key: str) -> list[float] | None:
    if scores is None:
        return None
    if not isinstance(scores, list):
        raise ValueError(f"{where}: field '{key}' must be a list of numbers, got {type(scores).__name__}")
    if len(scores) != n_steps:
        raise ValueError(f"{where}: field '{key}' has {len(scores)} scores for {n_steps} steps")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise ValueError(f"{where}: field '{key}[{i}]' must be a finite number in [0, 1], got {s!r}")
        out.append(float(s))
    return out


@dataclass
class DatasetBundle:
    """What a `dataset` config option builds: problems to train/evaluate on, and optionally
    ready-made preference pairs (PRM800K labels, Step-DPO files, user pair files)."""

    name: str
    train: list[Problem]
    eval: list[Problem]
    pairs: list[StepPair] | None = None
    answer_format: str = "plain"  # how answers are written in responses: plain | gsm8k | boxed
    pool: list[Problem] = field(default_factory=list)  # answer-only problems (no gold steps), disjoint from
    # train and eval: on-policy pairs can be sampled on them (`pairs.from_split=pool`), SFT never sees them
