"""Plain dataclasses that flow through the pipeline, and JSONL I/O with located errors.

Problem  -> a math problem with its gold solution split into steps.
StepPair -> a preference pair: prompt, shared prefix steps, chosen and rejected continuations,
            and (after scoring) one score in [0, 1] per continuation step.

Text layout seen by the model (see `prompt_text` / `response_text`):

    prompt   = format_prompt(question, tokenizer) + "".join(step + "\n" for step in prefix)
    response = "\n".join(steps)            (the tokenizer's EOS is appended as a token)

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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
        return STEP_SEP.join(self.steps)


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


def prompt_text(question: str, prefix: list[str] | tuple[str, ...] = (), tokenizer=None) -> str:
    return format_prompt(question, tokenizer) + "".join(s + STEP_SEP for s in prefix)


def response_text(steps: list[str]) -> str:
    return STEP_SEP.join(steps)


def step_spans(steps: list[str]) -> list[tuple[int, int]]:
    """Character span of each step in `response_text(steps)`.

    Step i covers [start_i, start_{i+1}): the separator after a step belongs to that step, so
    every character of the response lies in exactly one step. An empty step has an empty span.
    """
    spans, pos = [], 0
    for i, s in enumerate(steps):
        end = pos + len(s) + (len(STEP_SEP) if i < len(steps) - 1 else 0)
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
