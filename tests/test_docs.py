"""The commands README.md and docs/*.md show a user compose and pass the config checks (`config.validate_targets`)
as written: a documented override that a later change made invalid fails here, not on the user's first try.
Each `python -m stepdpo.run ...` (or `torchrun ... -m stepdpo.run ...`) line in a code block is taken without its
comment; a sweep's comma list is taken at its first value; lines with placeholders (`<date>`, `...`) are skipped."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, compose_config
from stepdpo.config import validate_targets

RUN = re.compile(r"(?:python|torchrun[^#]*?) -m stepdpo\.run(.*)")


def documented_commands():
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = False
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            m = RUN.search(line) if fenced or line.startswith("    ") else None
            if not m:
                continue
            args = m.group(1).split("#")[0].rstrip("\\ ").strip()
            if "<" in args or "..." in args:
                continue
            toks = [t for t in shlex.split(args) if t != "-m" and not t.startswith("--")]
            toks = [t.split("=", 1)[0] + "=" + t.split("=", 1)[1].split(",")[0] if "," in t and "[" not in t else t
                    for t in toks]
            yield pytest.param(toks, id=f"{f.relative_to(ROOT)}:{i}")


COMMANDS = list(documented_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15  # the extraction still finds them (README's common commands, the guides')


@pytest.mark.parametrize("overrides", COMMANDS)
def test_documented_command_composes_and_passes_the_config_checks(overrides):
    validate_targets(compose_config(*overrides, hydra=True))
