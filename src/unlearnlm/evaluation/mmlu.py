"""MMLU from local files, scored as the Open-Instruct evaluation that SemEval-2025 Task 4 ran.

Prompts (Hendrycks' format, as Open-Instruct builds them)::

    The following are multiple choice questions (with answers) about  abstract algebra.

    <question>
    A. <option>
    B. <option>
    C. <option>
    D. <option>
    Answer: <letter>

    ... (k dev examples) ...
    <test question>
    A. ...
    Answer:

The subject is the file stem with each underscore-separated word prefixed by a space, which is why
"about" is followed by two spaces: Open-Instruct's ``format_subject`` does exactly that, and we keep
it. Shots are dropped one at a time while the prompt exceeds 2048 tokens. The prediction is the
letter among the last tokens of ``" A"`` .. ``" D"`` with the highest next-token probability, and
``average_acc`` is micro-averaged over all test questions.

Layouts read: the original release (``dev/<subject>_dev.csv``, ``test/<subject>_test.csv``, no header,
columns question, A, B, C, D, answer) or a Hugging Face ``cais/mmlu`` parquet copy (columns
question, subject, choices, answer; files named ``dev-*.parquet`` / ``test-*.parquet``).
CSV cells are read as text; the original pandas reader turned all-numeric option columns into
numbers, which can print e.g. ``2.0`` where the file says ``2``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unlearnlm.errors import UserError
from unlearnlm.evaluation.likelihood import Progress, TokenCache, encode_texts, next_token_logits
from unlearnlm.evaluation.scoring import MMLU_THRESHOLD

CHOICES = ("A", "B", "C", "D")
DEFAULT_SHOTS = 5
MAX_PROMPT_TOKENS = 2048


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of CHOICES


@dataclass(frozen=True)
class Subject:
    name: str  # file stem, e.g. "abstract_algebra"
    dev: tuple[Question, ...]
    test: tuple[Question, ...]


def _question(cells: Sequence, where: str) -> Question:
    if len(cells) != 6:
        raise UserError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(cells)}")
    answer = str(cells[5]).strip()
    if answer not in CHOICES:
        raise UserError(f"{where}: answer {answer!r} is not one of A, B, C, D")
    return Question(str(cells[0]), tuple(str(cell) for cell in cells[1:5]), answer)  # type: ignore[arg-type]


def _read_csv(path: Path) -> tuple[Question, ...]:
    with path.open(encoding="utf-8", newline="") as handle:
        return tuple(_question(cells, f"{path} row {number}") for number, cells in enumerate(csv.reader(handle), start=1))


def _load_csv_layout(directory: Path) -> list[Subject]:
    subjects = []
    for test_file in sorted((directory / "test").glob("*_test.csv")):
        name = test_file.name.removesuffix("_test.csv")
        dev_file = directory / "dev" / f"{name}_dev.csv"
        subjects.append(Subject(name, _read_csv(dev_file) if dev_file.is_file() else (), _read_csv(test_file)))
    return subjects


def _read_parquet_split(files: list[Path]) -> dict[str, list[Question]]:
    import pyarrow.parquet as pq

    by_subject: dict[str, list[Question]] = defaultdict(list)
    for file in files:
        try:
            rows = pq.read_table(file, columns=["question", "subject", "choices", "answer"]).to_pylist()
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise UserError(f"{file}: not an MMLU parquet file ({err})") from None
        for number, row in enumerate(rows, start=1):
            where = f"{file} row {number}"
            if len(row["choices"]) != 4 or row["answer"] not in range(4):
                raise UserError(f"{where}: expected 4 choices and an answer index 0-3")
            by_subject[row["subject"]].append(_question([row["question"], *row["choices"], CHOICES[row["answer"]]], where))
    return by_subject


def _load_parquet_layout(directory: Path) -> list[Subject]:
    # A full cais/mmlu copy holds every question twice: in all/ and in its subject's folder.
    root = directory / "all" if (directory / "all").is_dir() else directory
    dev = _read_parquet_split(sorted(root.rglob("dev-*.parquet")))
    test = _read_parquet_split(sorted(root.rglob("test-*.parquet")))
    return [Subject(name, tuple(dev.get(name, ())), tuple(test[name])) for name in sorted(test)]


def load_mmlu(directory: str | Path) -> list[Subject]:
    """Every subject with test questions, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such MMLU directory")
    subjects = _load_csv_layout(directory) if (directory / "test").is_dir() else _load_parquet_layout(directory)
    if not subjects:
        raise UserError(f"{directory}: no MMLU test questions (expected test/*_test.csv or test-*.parquet files)")
    return subjects


def format_subject(name: str) -> str:
    return "".join(" " + word for word in name.split("_"))


def format_question(question: Question, include_answer: bool) -> str:
    text = question.question + "".join(f"\n{letter}. {option}" for letter, option in zip(CHOICES, question.options))
    return text + "\nAnswer:" + (f" {question.answer}\n\n" if include_answer else "")


def build_prompt(subject: Subject, question: Question, shots: int) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject.name)}.\n\n"
    examples = "".join(format_question(example, include_answer=True) for example in subject.dev[:shots])
    return header + examples + format_question(question, include_answer=False)


def fitted_prompt(tokenizer, subject: Subject, question: Question, shots: int, max_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """The prompt with as many of the ``shots`` examples as keep it within ``max_tokens`` tokens."""
    count = min(shots, len(subject.dev))
    prompt = build_prompt(subject, question, count)
    while count > 0 and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_tokens:
        count -= 1
        prompt = build_prompt(subject, question, count)
    return prompt


def choice_token_ids(tokenizer) -> list[int]:
    """The last token of each ``" A"`` .. ``" D"``, the tokens whose probabilities are compared."""
    return [tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in CHOICES]


def evaluate_mmlu(
    model,
    tokenizer,
    subjects: Sequence[Subject],
    shots: int = DEFAULT_SHOTS,
    batch_size: int = 8,
    progress: Progress | None = None,
    cache: TokenCache | None = None,
) -> dict:
    """``{"average_acc", "subject_acc", "n_questions", "shots", "below_threshold"}``."""
    questions = [(subject, question) for subject in subjects for question in subject.test]
    prompts = [fitted_prompt(tokenizer, subject, question, shots) for subject, question in questions]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logits = next_token_logits(model, encode_texts(tokenizer, prompts, cache), pad_id, batch_size, progress)
    predictions = logits[:, choice_token_ids(tokenizer)].argmax(dim=-1).tolist()
    correct = [CHOICES[prediction] == question.answer for prediction, (_, question) in zip(predictions, questions)]
    subject_acc = {}
    for subject in subjects:
        hits = [hit for hit, (owner, _) in zip(correct, questions) if owner is subject]
        subject_acc[subject.name] = sum(hits) / len(hits)
    average = sum(correct) / len(correct)
    return {
        "average_acc": average,
        "subject_acc": subject_acc,
        "n_questions": len(correct),
        "shots": shots,
        "below_threshold": average < MMLU_THRESHOLD,
    }


def lm_eval_mmlu(model, tokenizer, shots: int = DEFAULT_SHOTS, batch_size: int = 8) -> dict:
    """MMLU through EleutherAI's lm-evaluation-harness (``pip install 'unlearnlm[lm-eval]'``).

    The harness fetches the dataset itself, so this needs its cache or network access.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("the lm-eval adapter needs the optional dependency: pip install 'unlearnlm[lm-eval]'") from None
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=harness_model, tasks=["mmlu"], num_fewshot=shots)
    return {"average_acc": results["results"]["mmlu"]["acc,none"], "shots": shots, "source": "lm-eval"}
