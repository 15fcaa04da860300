"""Preference pairs for DPO: (prompt, chosen answer, rejected answer) as token ids.

Three sources (``--prefs``):

* ``teacher`` (the default, offline): prompts are user messages the teacher writes (as in
  ``--data teacher``); ``chosen`` is the teacher's answer to each, ``rejected`` the student's own
  answer to the same prompt (both sampled, ``sampling.sample``).
* a ``.jsonl`` file, one pair per line: ``{"prompt": str, "chosen": str, "rejected": str}``, or the
  chat-message form of ``HuggingFaceH4/ultrafeedback_binarized`` (``chosen`` / ``rejected`` are
  message lists whose last message is the assistant's answer; the prompt is the messages before it).
* ``hf:NAME[:SPLIT]``: a Hub dataset in either form, through ``datasets`` (online).

Prompts are rendered with the tokenizer's chat template (a generation prompt after them); each
answer ends with the end-of-turn token. Lengths as TRL's DPO defaults in X-EcoMLA's dpo.yaml:
a prompt keeps its last ``max_prompt`` tokens, an answer is cut to ``max_length`` with its prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import console
from ..errors import XecomlaError
from ..text.chat import has_chat_template, left_pad, stop_ids, trim_at_stop, user_header
from ..text.sampling import sample
from ..text.validate import check_text

ANSWER_TOKENS = 256  # most tokens of a sampled answer in a teacher-built pair
PROMPT_TOKENS = 64  # most tokens of a sampled user message


@dataclass
class Pairs:
    """N preference pairs as token-id lists: prompt[i] + chosen[i] is preferred to prompt[i] + rejected[i]."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat safetensors form: each field's ids concatenated, with the row lengths."""
        out = {}
        for name in ("prompt", "chosen", "rejected"):
            rows = getattr(self, name)
            out[name] = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
            out[f"{name}_len"] = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Pairs:
        fields = {}
        for name in ("prompt", "chosen", "rejected"):
            fields[name] = [x.tolist() for x in t[name].split(t[f"{name}_len"].tolist())]
        return cls(**fields)


def check_pairs(pairs: Pairs, source: str) -> Pairs:
    """Drop pairs whose answers are equal (no preference in them); refuse data with none left."""
    if len(pairs) == 0:
        raise XecomlaError(f"the preference data '{source}' holds no pairs: give prompt/chosen/rejected records")
    keep = [i for i in range(len(pairs)) if pairs.chosen[i] != pairs.rejected[i] and pairs.chosen[i]]
    if not keep:
        raise XecomlaError(
            f"in the preference data '{source}' chosen equals rejected in every pair: there is nothing to prefer"
        )
    return Pairs(*([getattr(pairs, f)[i] for i in keep] for f in ("prompt", "chosen", "rejected")))


# ---- records (JSONL, Hub datasets) -----------------------------------------------------------------
def record_texts(rec: dict, where: str) -> tuple[list[dict] | str, str, str]:
    """(prompt as messages or text, chosen answer, rejected answer) of one record, in either form."""
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing or not isinstance(rec, dict):
        raise XecomlaError(
            f"{where}: a preference record needs 'chosen' and 'rejected' (and 'prompt'); {missing} missing"
        )
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):  # chat messages (ultrafeedback_binarized)
        if not chosen or not rejected or chosen[-1].get("role") != "assistant":
            raise XecomlaError(f"{where}: 'chosen' and 'rejected' messages must end with the assistant's answer")
        prompt = chosen[:-1] or [{"role": "user", "content": str(rec.get("prompt", ""))}]
        return prompt, str(chosen[-1].get("content", "")), str(rejected[-1].get("content", ""))
    if "prompt" not in rec:
        raise XecomlaError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'")
    return str(rec["prompt"]), str(chosen), str(rejected)


def read_records(source: str) -> list[dict]:
    """The records of a .jsonl file or of hf:NAME[:SPLIT]."""
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise XecomlaError("hf: preference data needs the 'datasets' package: pip install datasets") from None
        try:
            return list(datasets.load_dataset(name, split=split or "train_prefs"))
        except Exception as exc:  # offline, unknown name, bad split: one line
            raise XecomlaError(f"cannot load the dataset '{name}': {str(exc).splitlines()[0]}") from None
    path = Path(source)
    if not path.is_file():
        raise XecomlaError(f"preference data '{source}' is not a file: give a .jsonl file, hf:NAME or 'teacher'")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise XecomlaError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return records


def encode_records(records: list[dict], tokenizer, source: str) -> Pairs:
    """Records -> token ids: the prompt in the chat template, each answer + the end-of-turn token."""
    vocab = tokenizer.get_vocab()
    end = vocab.get("<|im_end|>", vocab.get("<|eot_id|>", tokenizer.eos_token_id))
    pairs = Pairs([], [], [])
    for n, rec in enumerate(records, 1):
        prompt, chosen, rejected = record_texts(rec, f"{source}: record {n}")
        prompt_texts = [m.get("content", "") for m in prompt] if isinstance(prompt, list) else [prompt]
        for field, text in (("prompt", "\n".join(map(str, prompt_texts))), ("chosen", chosen), ("rejected", rejected)):
            check_text(text, tokenizer, f"{source}: record {n}'s '{field}'")  # text/validate.py: one line if not
        pairs.prompt.append(render_prompt(tokenizer, prompt))
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            getattr(pairs, field).append(tokenizer(text, add_special_tokens=False)["input_ids"] + [end])
    return pairs


def render_prompt(tokenizer, prompt: list[dict] | str) -> list[int]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=False)["input_ids"]


# ---- pairs written by the teacher and the student ------------------------------------------------
def teacher_pairs(teacher, student, tokenizer, n: int, *, batch: int = 16, temperature: float = 1.0, seed: int = 0):
    """``n`` pairs: a user message the teacher writes, the teacher's answer (chosen) and the
    student's answer (rejected) to that same rendered prompt. Seeded; the RNG state is restored."""
    if not has_chat_template(tokenizer):
        raise XecomlaError("teacher-built preference pairs need a chat model (a tokenizer with a chat template)")
    pairs = Pairs([], [], [])
    with torch.random.fork_rng(), console.make_progress() as progress:
        task = progress.add_task("building preference pairs", total=n)
        torch.manual_seed(seed)
        while len(pairs) < n:
            prompts = teacher_prompts(teacher, tokenizer, min(batch, n - len(pairs)), temperature)
            pairs.prompt += prompts
            pairs.chosen += answers(teacher, tokenizer, prompts, temperature)
            pairs.rejected += answers(student, tokenizer, prompts, temperature)
            progress.update(task, completed=len(pairs))
    return pairs


def teacher_prompts(model, tokenizer, batch: int, temperature: float) -> list[list[int]]:
    """``batch`` user messages sampled after the user header, each rendered as a chat prompt."""
    stop = stop_ids(tokenizer)
    header = tokenizer(user_header(tokenizer), add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([header] * batch, stop[0], _device(model))
    out = []
    for row in sample(model, ids, mask, PROMPT_TOKENS, stop, temperature).cpu():
        text = tokenizer.decode([t for t in trim_at_stop(row, stop) if t not in stop], skip_special_tokens=True).strip()
        out.append(render_prompt(tokenizer, text or "Hello!"))
    return out


def answers(model, tokenizer, prompts: list[list[int]], temperature: float) -> list[list[int]]:
    """The model's sampled answer to each rendered prompt, up to and including its end-of-turn token."""
    stop = stop_ids(tokenizer)
    ids, mask = left_pad(prompts, stop[0], _device(model))
    was_training = model.training
    model.eval()
    rows = sample(model, ids, mask, ANSWER_TOKENS, stop, temperature).cpu()
    model.train(was_training)
    return [trim_at_stop(r, stop) for r in rows]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def load_pairs(source: str, tokenizer, **teacher_kw) -> Pairs:
    """The checked pairs of `source` ('teacher': built by `teacher_pairs(**teacher_kw)`)."""
    if source == "teacher":
        pairs = teacher_pairs(tokenizer=tokenizer, **teacher_kw)
    else:
        pairs = encode_records(read_records(source), tokenizer, source)
    return check_pairs(pairs, source)
