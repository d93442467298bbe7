"""Prompt datasets for text-to-image distillation (DMD2 is data-free: prompts are the only training data).

A source is one of
- a ``.txt`` file: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- a ``.csv`` file with a header: the caption column (``t2i.caption_key``, default ``caption``);
- a ``.jsonl`` file: one JSON object per line with a string under the caption key;
- a project prompt set by name: ``detail`` (``eval/prompts/detail_prompts.txt``).

Relative paths that do not exist here are looked up in the project root and in the package (paths in
``configs/``, shipped as ``dmd_dar/configs``).

Empty sources and invalid rows are ``UserError``s that name the file and the line numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dmd_dar.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
# dmd_dar/prompt_sets: in a source checkout a link to eval/prompts, in a wheel its copy (package data)
PROMPT_SETS = {"detail": PROJECT_ROOT / "dmd_dar" / "prompt_sets" / "detail_prompts.txt"}
_MAX_LISTED = 10


def _lines(bad: list[int]) -> str:
    shown = ", ".join(str(n) for n in bad[:_MAX_LISTED])
    return f"line{'s' if len(bad) > 1 else ''} {shown}{' ...' if len(bad) > _MAX_LISTED else ''}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text; save the file as UTF-8") from None


def _txt(path: Path) -> list[str]:
    prompts = []
    for line in _read_text(path).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts


def _csv(path: Path, key: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or key not in reader.fieldnames:
            raise UserError(f"{path}: no '{key}' column in the header ({', '.join(reader.fieldnames or [])}); "
                            f"set t2i.caption_key to the caption column")
        prompts, bad = [], []
        for row in reader:
            text = (row.get(key) or "").strip()
            if text:
                prompts.append(text)
            else:
                bad.append(reader.line_num)
    if bad:
        raise UserError(f"{path}: empty '{key}' on {_lines(bad)}; fill in or remove those rows")
    return prompts


def _jsonl(path: Path, key: str) -> list[str]:
    prompts, bad = [], []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        text = rec.get(key) if isinstance(rec, dict) else None
        if isinstance(text, str) and text.strip():
            prompts.append(text.strip())
        else:
            bad.append(n)
    if bad:
        raise UserError(f"{path}: {_lines(bad)} not a JSON object with a non-empty string '{key}'; fix or remove them")
    return prompts


def load_prompts(source: str, caption_key: str = "caption") -> list[str]:
    """The prompts of one source (see the module docstring)."""
    path = PROMPT_SETS.get(source, Path(source).expanduser())
    if not path.is_file() and not path.is_absolute():
        # project-relative paths in configs/ (configs/t2i/imagenet_class_ids.txt): the source checkout's, or the
        # copy shipped inside the package (dmd_dar/configs) after a non-editable install
        for root in (PROJECT_ROOT, PROJECT_ROOT / "dmd_dar"):
            if (root / path).is_file():
                path = root / path
                break
    if not path.is_file():
        raise UserError(f"prompt file {source} not found; pass a .txt / .csv / .jsonl file or a prompt set "
                        f"({', '.join(PROMPT_SETS)})")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        prompts = _csv(path, caption_key)
    elif suffix in (".jsonl", ".json"):
        prompts = _jsonl(path, caption_key)
    else:
        prompts = _txt(path)
    if not prompts:
        raise UserError(f"{path}: no prompts in this file; add one prompt per line (or row)")
    return prompts


def load_prompt_sources(sources: list[str], caption_key: str = "caption") -> list[str]:
    """All prompts of ``sources``, in order."""
    if not sources:
        raise UserError("t2i.prompts is empty; give prompt files, e.g. t2i.prompts=[my_prompts.txt] or [detail]")
    out: list[str] = []
    for s in sources:
        out.extend(load_prompts(s, caption_key))
    return out
