"""The tiny benchmark's sets, drawn from a LUME-format directory (docs/benchmark.md).

A LUME-format directory holds ``train/{forget,retain}.jsonl`` and ``validation/{forget,retain}.jsonl``.
Rows sharing a document id (``id[:-3]``) form a document, and a document is always used whole.

Draws: the documents of each task in each source file are put in a seeded order, and draw ``d`` takes
the ``d``-th block of ``n`` documents of that order. Draws of one seed are therefore disjoint (the
benchmark tunes on draw 1 and reports on draw 0) and the same seed always gives the same documents.

- F (forget): ``n`` documents per task of train forget.
- R (retain): ``n`` documents per task of train retain.
- G (general): ``n`` documents per task of validation retain; the target learns them, unlearning never
  sees them, and the utility score asks their questions.
- MIA members: the Task3 documents of F, as the target saw them (``input + " " + output`` of their
  sentence-completion row). Nonmembers: as many Task3 documents of validation forget, never fine-tuned on.
- P (pretraining pool, ``pretraining_pool``): the stand-in for the web corpus the base model learns
  language from. It does not depend on the draw: the text of every Task3 document (real Wikipedia
  biographies, as Wikipedia was in the SemEval models' pretraining corpus, so the MIA members and
  nonmembers alike) and every row of the Task1 and Task2 documents of validation forget, which no set
  draws from. The other Task1 and Task2 documents are synthetic and were in no pretraining corpus.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from unlearnlm.bench.sizes import SIZES, SizePreset, get_size
from unlearnlm.data.overlap import sharing_indices
from unlearnlm.data.records import Record, content_sha256, load_documents, load_records, write_jsonl
from unlearnlm.errors import UserError

TASKS = ("Task1", "Task2", "Task3")
MIA_TASK = "Task3"
SET_FILES = ("forget.jsonl", "retain.jsonl", "general.jsonl", "mia_members.jsonl", "mia_nonmembers.jsonl")
MANIFEST_NAME = "manifest.json"


# The documents of each size, from the benchmark's one size table.
PRESETS: dict[str, SizePreset] = {name: size.sets for name, size in SIZES.items()}


@dataclass(frozen=True)
class Document:
    id: str
    task: str
    rows: tuple[Record, ...]

    def text(self) -> str:
        """The whole document as the target was trained on it: its sentence completion, joined."""
        for row in self.rows:
            if row.kind == "sc":
                return row.input + " " + row.output
        raise UserError(f"document {self.id!r} has no sentence-completion row, so it has no MIA text")


@dataclass(frozen=True)
class BenchmarkSets:
    preset: SizePreset
    seed: int
    draw: int
    forget: tuple[Document, ...]
    retain: tuple[Document, ...]
    general: tuple[Document, ...]
    mia_members: tuple[Document, ...]
    mia_nonmembers: tuple[Document, ...]

    @staticmethod
    def rows(documents: tuple[Document, ...]) -> list[Record]:
        return [row for document in documents for row in document.rows]

    def training_rows(self) -> list[Record]:
        """Everything the target learns: F, R and G."""
        return self.rows(self.forget) + self.rows(self.retain) + self.rows(self.general)


def bundled_lume_dir() -> Path:
    """The LUME copy shipped inside the package (a real directory: the package is never zipped)."""
    return Path(str(resources.files("unlearnlm") / "resources" / "lume"))


def get_preset(name: str) -> SizePreset:
    return get_size(name).sets


def group_documents(rows: list[Record]) -> dict[str, list[Document]]:
    """Documents per task, in file order."""
    grouped: dict[str, list[Record]] = {}
    for row in rows:
        grouped.setdefault(row.document_id, []).append(row)
    by_task: dict[str, list[Document]] = {task: [] for task in TASKS}
    for document_id, members in grouped.items():
        tasks = {row.task for row in members}
        if len(tasks) != 1:
            raise UserError(f"document {document_id!r} mixes tasks {sorted(tasks)}")
        task = tasks.pop()
        if task not in by_task:
            raise UserError(f"document {document_id!r}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
        by_task[task].append(Document(document_id, task, tuple(members)))
    return by_task


def seeded_order(documents: list[Document], seed: int, label: str) -> list[Document]:
    # A string seed is hashed the same way in every process, unlike hash(); the label (file and task)
    # keeps the orders of different files and tasks independent.
    shuffled = list(documents)
    random.Random(f"unlearnlm-sets:{seed}:{label}").shuffle(shuffled)
    return shuffled


def take_block(documents: list[Document], n: int | None, draw: int, seed: int, label: str) -> list[Document]:
    """Draw ``draw`` of ``n`` documents; ``n=None`` is every document (draw 0 only)."""
    if n is None:
        if draw != 0:
            raise UserError(f"{label}: a preset that takes every document has only draw 0")
        return list(documents)
    start = draw * n
    if start + n > len(documents):
        raise UserError(f"{label}: {len(documents)} documents, too few for draw {draw} of {n} documents")
    return seeded_order(documents, seed, label)[start:start + n]


def draw_split(rows: list[Record], n: int | None, draw: int, seed: int, source: str) -> tuple[Document, ...]:
    by_task = group_documents(rows)
    return tuple(
        document for task in TASKS for document in take_block(by_task[task], n, draw, seed, f"{source} {task}")
    )


def check_general(general: tuple[Document, ...], minimum: int) -> None:
    questions = Counter(row.task for row in BenchmarkSets.rows(general) if row.kind == "qa")
    for task in TASKS:
        if questions[task] < minimum:
            raise UserError(
                f"the general set has {questions[task]} {task} questions; utility needs at least {minimum} per task"
            )


def draw_sets(
    data_dir: str | Path | None = None, size: str | SizePreset = "mini", seed: int = 0, draw: int = 0
) -> BenchmarkSets:
    """Draw F, R, G and the MIA documents from a LUME-format directory (default: the bundled copy)."""
    if draw < 0:
        raise UserError(f"draw must be >= 0, got {draw}")
    preset = get_preset(size) if isinstance(size, str) else size
    root = Path(data_dir) if data_dir is not None else bundled_lume_dir()
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a LUME-format directory with train/ and validation/)")

    def load(part: str, split: str) -> list[Record]:
        return load_records(root / part, split)

    forget = draw_split(load("train", "forget"), preset.forget_docs, draw, seed, "train/forget")
    retain = draw_split(load("train", "retain"), preset.retain_docs, draw, seed, "train/retain")
    general = draw_split(load("validation", "retain"), preset.general_docs, draw, seed, "validation/retain")
    check_general(general, preset.general_questions)

    members = tuple(document for document in forget if document.task == MIA_TASK)[: preset.mia_docs]
    pool = group_documents(load("validation", "forget"))[MIA_TASK]
    nonmembers = tuple(take_block(pool, len(members), draw, seed, f"validation/forget {MIA_TASK}"))
    return BenchmarkSets(preset, seed, draw, forget, retain, general, members, nonmembers)


def pretraining_pool(data_dir: str | Path | None = None) -> tuple[Document, ...]:
    """P, the same for every draw and seed (see the module docstring), in file order."""
    root = Path(data_dir) if data_dir is not None else bundled_lume_dir()
    pool: list[Document] = []
    for part in ("train", "validation"):
        for split in ("forget", "retain"):
            by_task = group_documents(load_records(root / part, split))
            pool += by_task[MIA_TASK]
            if (part, split) == ("validation", "forget"):
                pool += [document for task in TASKS if task != MIA_TASK for document in by_task[task]]
    return tuple(pool)


def pool_texts(pool: tuple[Document, ...]) -> list[str]:
    """P as text: a Task3 document is its page text alone (its questions were written for LUME, not
    found on the web); a pool document of the other tasks gives every row, questions included."""
    return [document.text() for document in pool if document.task == MIA_TASK] + [
        row.input + " " + row.output for document in pool if document.task != MIA_TASK for row in document.rows
    ]


UNSEEN_NAME = "unseen.jsonl"
UNSEEN_DOCUMENTS = 64


def unseen_documents(set_dir: Path, data_dir: str | Path | None = None, count: int = UNSEEN_DOCUMENTS) -> list[str]:
    """Text a target saw only in pretraining, of the MIA nonmembers' kind, for ``--unseen``: a seeded
    sample of the pool's Task3 biographies that no set of ``set_dir`` holds and that share no text
    (``data.overlap``) with any of them, as the bench's level documents are drawn."""
    manifest = json.loads((set_dir / MANIFEST_NAME).read_text())
    in_sets = {doc for entry in manifest["files"].values() for doc in entry["documents"]}
    outside = [doc.text() for doc in pretraining_pool(data_dir) if doc.task == MIA_TASK and doc.id not in in_sets]
    texts = [row.input + " " + row.output for name in ("forget.jsonl", "retain.jsonl", "general.jsonl")
             for row in load_records(set_dir / name, "retain")]
    texts += [document for name in ("mia_members.jsonl", "mia_nonmembers.jsonl") for document in load_documents(set_dir / name)]
    sharing = set(sharing_indices(outside, texts))
    clean = [text for index, text in enumerate(outside) if index not in sharing]
    return random.Random("unlearnlm-unseen").sample(clean, min(count, len(clean)))


def write_unseen(set_dir: Path, data_dir: str | Path | None = None) -> Path:
    """``unseen.jsonl`` (``{"text": ...}`` lines) beside the sets, from ``unseen_documents``; kept when there."""
    path = set_dir / UNSEEN_NAME
    if not path.is_file():
        staging = path.with_name(f".{UNSEEN_NAME}.partial")
        write_jsonl(({"text": text} for text in unseen_documents(set_dir, data_dir)), staging)
        staging.replace(path)
    return path


def write_sets(sets: BenchmarkSets, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the five set files and ``manifest.json`` (what was drawn, each file's sha256, and ``extra``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row_sets = {"forget.jsonl": sets.forget, "retain.jsonl": sets.retain, "general.jsonl": sets.general}
    for name, documents in row_sets.items():
        write_jsonl((row.to_dict() for row in sets.rows(documents)), out / name)
    mia_sets = {"mia_members.jsonl": sets.mia_members, "mia_nonmembers.jsonl": sets.mia_nonmembers}
    for name, documents in mia_sets.items():
        # The official MIA format has only ``document``; the manifest keeps the ids.
        write_jsonl(({"document": document.text()} for document in documents), out / name)

    manifest = {
        "preset": asdict(sets.preset),
        "seed": sets.seed,
        "draw": sets.draw,
        "files": {
            name: {
                "documents": [document.id for document in documents],
                "rows": len(sets.rows(documents)) if name in row_sets else len(documents),
                "sha256": content_sha256(out / name),
            }
            for name, documents in {**row_sets, **mia_sets}.items()
        },
        **(extra or {}),
    }
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest_path
