"""The tokenizer as GGUF metadata that llama.cpp tokenises exactly like transformers.

llama.cpp re-implements each Hugging Face pre-tokenizer by name (``tokenizer.ggml.pre``). We read the
checkpoint's own ``tokenizer.json`` (not the base model's: the demo's transformers tokenizer, built
from its GGUF, does not split digits as SmolLM2's does) and name the llama.cpp pre-tokenizer with
the same rules:

    ByteLevel(use_regex)                                 gpt-2    (GPT-2 regex)
    Sequence[Digits(individual), ByteLevel(use_regex)]   smollm   (digits one by one, then GPT-2)
    Sequence[Split(Llama-3 regex), ByteLevel]            llama-bpe
    Sequence[Split(Qwen2 regex), ByteLevel]              qwen2

Anything else is refused with one line; the verification then compares token ids on real text.
Tokens and token types follow llama.cpp's converter: an added special token is CONTROL, another
added token USER_DEFINED, ids the tokenizer lacks below the model's vocab size are ``[PAD<i>]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import XecomlaError

GPT2 = "gpt-2"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
IGNORES_MERGES = {"llama-bpe"}  # llama.cpp looks whole words up first for these (HF: ignore_merges)

# token types (gguf.TokenType)
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


@dataclass
class TokenizerMeta:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer) -> None:
        """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, {"unk": "add_unk_token_id"}.get(kind, f"add_{kind}_token_id"))(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _refuse(what: str) -> XecomlaError:
    return XecomlaError(f"the tokenizer {what}, which llama.cpp cannot reproduce exactly: export --format hf instead")


def _byte_level(pt: dict, *, regex: bool) -> bool:
    return pt.get("type") == "ByteLevel" and not pt.get("add_prefix_space") and bool(pt.get("use_regex")) == regex


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json ``pre_tokenizer``, or one line why not."""
    if pre is None:
        raise _refuse("has no pre-tokenizer (not a byte-level BPE)")
    if _byte_level(pre, regex=True):
        return GPT2
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and _byte_level(steps[1], regex=True):
        digits = steps[0]
        if digits.get("type") == "Digits" and digits.get("individual_digits"):
            return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], regex=False) and steps[0].get("type") == "Split":
        split = steps[0]
        name = SPLIT_PRE.get(split.get("pattern", {}).get("Regex"))
        if name and split.get("behavior") == "Isolated" and not split.get("invert"):
            return name
    raise _refuse(f"pre-tokenizes with {json.dumps(pre)[:160]}")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_flags(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds a BOS / an EOS token around the text (and nothing else)."""
    text = "Hello world"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] and full[1:2] == plain[:1]
    inner = full[1:] if add_bos else full
    add_eos = (
        tokenizer.eos_token_id is not None and len(inner) == len(plain) + 1 and inner[-1] == tokenizer.eos_token_id
    )
    if (inner[:-1] if add_eos else inner) != plain:
        raise _refuse(f"adds tokens around the text that are not BOS/EOS ({full} for {plain})")
    return add_bos, add_eos


def tokenizer_metadata(tokenizer, vocab_size: int, eos_token_id: int | None = None) -> TokenizerMeta:
    """The GGUF tokenizer of a transformers fast tokenizer, for a model with ``vocab_size`` rows.

    ``eos_token_id`` (the generation config's) overrides the tokenizer's end-of-sequence token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse("is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise _refuse(f"is a {model.get('type')} model, not byte-level BPE")
    normalizer = spec.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        if normalizer.get("type") != "NFC":  # llama.cpp's qwen2/llama-bpe converters accept NFC as a no-op
            raise _refuse(f"normalises text ({normalizer.get('type')})")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if bool(model.get("ignore_merges")) != (pre in IGNORES_MERGES):
        raise _refuse(f"has ignore_merges {model.get('ignore_merges')} with the {pre} pre-tokenizer")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise _refuse(f"has ids up to {max(vocab.values())} beyond the model's {vocab_size} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(CONTROL if added[token].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    ids = {"bos": tokenizer.bos_token_id, "eos": eos, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    add_bos, add_eos = _add_flags(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return TokenizerMeta(
        pre=pre,
        tokens=tokens,
        types=types,
        merges=_merges(model),
        special_ids={k: int(v) for k, v in ids.items() if v is not None},
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
    )
