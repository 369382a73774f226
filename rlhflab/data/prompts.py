"""Prompt files → prompts with per-prompt metadata, and formatting them for the model.

Formats, by extension:
  .jsonl  one object per line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]};
          any other fields become metadata passed to the reward
  .csv    a header row with a `prompt` column; other columns become metadata
  other   plain text, one prompt per line (blank lines and lines starting with # are skipped)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhflab.errors import UserError
from rlhflab.files import read_text


@dataclass
class Prompt:
    text: str | None = None  # a plain prompt
    messages: list[dict] | None = None  # or a conversation (chat format)
    metadata: dict = field(default_factory=dict)

    @property
    def display(self) -> str:
        """The prompt as a reward function sees it: the text, or the last user message."""
        if self.text is not None:
            return self.text
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


def _from_record(record: dict, where: str) -> Prompt:
    if "prompt" in record:
        prompt = record.pop("prompt")
        if isinstance(prompt, list):  # conversational prompt in TRL style
            record["messages"] = prompt
        elif not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string")
        else:
            return Prompt(text=prompt, metadata=record)
    if "messages" in record:
        messages = record.pop("messages")
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise UserError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
        return Prompt(messages=messages, metadata=record)
    raise UserError(f"{where}: needs a 'prompt' or 'messages' field (found: {', '.join(record) or 'nothing'})")


def iter_jsonl(path: Path, what: str = "JSONL file", fix: str = "pass a UTF-8 file of one JSON object per line"):
    """(line number, object) for each non-blank line; a line that is not a JSON object is a UserError naming it."""
    for n, line in enumerate(read_text(path, what, fix).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: each line must be a JSON object, got {type(record).__name__}")
        yield n, record


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; every bad line is reported with its file and line number."""
    if not path:
        raise UserError("no prompt file: set data.prompts in the recipe (or --set data.prompts=FILE)")
    path = Path(path)
    what, fix = "prompt file", "set data.prompts to a UTF-8 .jsonl, .csv or .txt file"
    prompts: list[Prompt] = []
    if path.suffix == ".jsonl":
        for n, record in iter_jsonl(path, what, fix):
            prompts.append(_from_record(record, f"{path}:{n}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, what, fix), newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise UserError(f"{path}:1: the CSV header needs a 'prompt' column (found: {reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            prompts.append(_from_record(dict(row), f"{path}:{n}"))
    else:
        for line in read_text(path, what, fix).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(Prompt(text=line.strip()))
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts; write one prompt per line (lines starting with # "
                        "are comments), or use a .jsonl / .csv with a 'prompt' field")
    return prompts


def resolve_prompt_format(tokenizer, requested: str, model_name: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "auto":
        return "chat" if has_template else "plain"
    if requested == "chat" and not has_template:
        raise UserError(
            f"model.prompt_format is 'chat' but '{model_name}' has no chat template; use prompt_format: plain"
        )
    return requested


def bos_text(tokenizer) -> str:
    """The BOS token's text if the tokenizer starts every encoding with it (Llama, Gemma), else "".

    Rendered prompts are tokenized without special tokens, so that a chat template's own BOS is not doubled;
    a plain prompt gets its BOS from `render_prompt` instead.
    """
    bos = tokenizer.bos_token_id
    wants = bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]
    return tokenizer.bos_token if wants else ""


def render_prompt(prompt: Prompt, tokenizer, prompt_format: str, system_prompt: str | None = None) -> str:
    """The exact text fed to the model: the chat template with a generation prompt, or the raw text after the
    BOS the tokenizer would add."""
    if prompt_format == "plain":
        text = "\n".join(m["content"] for m in prompt.messages) if prompt.text is None else prompt.text
        bos = bos_text(tokenizer)
        return text if text.startswith(bos) else bos + text
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptSampler:
    """Draws prompts in shuffled passes over the file; its state is part of a checkpoint."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle = n, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def draw(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
            out.append(self.order.pop(0))
        return out

    def state_dict(self) -> dict:
        return {"order": self.order, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])


class GroupSampler:
    """Draws `counts[g]` prompts from each group per call, each group in its own shuffled passes.

    Groups are numbered in order and their prompts concatenated: group g owns indices offsets[g] ..
    offsets[g] + sizes[g] − 1. Group 0 draws from `seed` itself, so a single group samples as PromptSampler does.
    """

    def __init__(self, sizes: list[int], counts: list[int], shuffle: bool, seed: int):
        self.counts = counts
        self.offsets = [sum(sizes[:g]) for g in range(len(sizes))]
        self.samplers = [PromptSampler(n, shuffle, seed + 1000 * g) for g, n in enumerate(sizes)]

    def draw(self) -> list[int]:
        """Global prompt indices, group by group: counts[0] from group 0, then counts[1] from group 1, ..."""
        return [offset + i for offset, sampler, k in zip(self.offsets, self.samplers, self.counts)
                for i in sampler.draw(k)]

    def state_dict(self) -> dict:
        return {"groups": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before prompt groups holds one PromptSampler's state
        for sampler, saved in zip(self.samplers, state.get("groups", [state])):
            sampler.load_state_dict(saved)
