"""SemEval-2025 Task 4 / LUME rows: loading from jsonl, parquet or a directory, with validation.

A row is ``{id, input, output, task}`` (``split`` optional). Its kind comes from the id suffix,
exactly as the official script decides it: ``id[:-1]`` ending in ``sc`` is a sentence completion,
ending in ``qa`` a question.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from unlearnlm.errors import UserError

REQUIRED_FIELDS = ("id", "input", "output", "task")

# The official release file names, so a user can point at the downloaded SemEval directory.
SEMEVAL_PARQUET_NAMES = {
    "forget": ("forget_train-00000-of-00001.parquet", "forget_validation-00000-of-00001.parquet"),
    "retain": ("retain_train-00000-of-00001.parquet", "retain_validation-00000-of-00001.parquet"),
}


@dataclass(frozen=True)
class Record:
    id: str
    input: str
    output: str
    task: str
    split: str = ""

    @property
    def kind(self) -> str:
        return row_kind(self.id)

    @property
    def document_id(self) -> str:
        return self.id[:-3]

    def to_dict(self) -> dict:
        return asdict(self)


def row_kind(row_id: str) -> str:
    """'sc' or 'qa', decided like the official script; anything else is an error."""
    stem = row_id[:-1]
    if stem.endswith("sc"):
        return "sc"
    if stem.endswith("qa"):
        return "qa"
    raise UserError(f"row id {row_id!r} does not end in 'sc<digit>' or 'qa<digit>', so its kind is unknown")


def validate_row(raw: dict, where: str) -> Record:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in raw or raw[name] is None]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in REQUIRED_FIELDS:
        if not isinstance(raw[name], str):
            raise UserError(f"{where}: field {name!r} must be a string")
    record = Record(
        id=raw["id"], input=raw["input"], output=raw["output"], task=raw["task"],
        split=str(raw.get("split") or ""),
    )
    try:
        row_kind(record.id)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return record


def _read_jsonl(path: Path) -> list[dict]:
    _refuse_compressed(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        line_number = 0
        try:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    rows.append(_parse_line(line, path, line_number))
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{line_number + 1}: not UTF-8 text (byte {err.object[err.start]:#04x})") from None
    return rows


def _parse_line(line: str, path: Path, line_number: int):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
    if "\\u" in line:  # an escape may name half of a UTF-16 pair, which no tokenizer can encode
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{path}:{line_number}: a \\u escape names a lone surrogate, not a character") from None
    return row


COMPRESSED = {b"\x1f\x8b": "gzip", b"PK": "zip", b"BZ": "bzip2", b"\xfd7": "xz", b"\x28\xb5": "zstd"}


def _refuse_compressed(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if head in COMPRESSED:
        raise UserError(f"{path}: a {COMPRESSED[head]} archive, not JSON lines; decompress it first")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: cannot read parquet ({err})") from None


def read_table(file: Path) -> list[dict]:
    """The rows of one .jsonl or .parquet file, unchecked."""
    if file.suffix in (".jsonl", ".json"):
        return _read_jsonl(file)
    if file.suffix == ".parquet":
        return _read_parquet(file)
    raise UserError(f"{file}: unsupported file type (use .jsonl or .parquet)")


def _resolve_directory(directory: Path, split: str) -> list[Path]:
    for name in (f"{split}.jsonl", f"{split}.parquet"):
        if (directory / name).is_file():
            return [directory / name]
    # A downloaded SemEval snapshot keeps its parquet files under data/.
    official = [folder / name for folder in (directory, directory / "data")
                for name in SEMEVAL_PARQUET_NAMES.get(split, ()) if (folder / name).is_file()]
    if official:
        return official[:1]
    raise UserError(f"{directory}: no {split}.jsonl, {split}.parquet or SemEval parquet file for the {split} set")


def data_files(path: str | Path, split: str = "forget") -> list[Path]:
    """The files a rows argument names: a file, a directory, or a Hub data set split ``ORG/NAME:SPLIT``."""
    from unlearnlm.data.layouts import hub_split_files, parse_hub_split

    path = Path(path)
    if path.is_dir():
        return _resolve_directory(path, split)
    if path.exists():
        if not path.is_file():  # a FIFO or a device would block the read, or never end it
            raise UserError(f"{path}: not a regular file (a FIFO, device or socket); give a .jsonl or .parquet file")
        return [path]
    if path.is_symlink():
        raise UserError(f"{path}: a symbolic link that leads nowhere (its target is missing, or the links loop)")
    if parse_hub_split(path):
        return hub_split_files(str(path))
    raise UserError(f"{path}: no such file or directory (nor a Hub data set split ORG/NAME:SPLIT)")


def load_records(path: str | Path, split: str = "forget", allow_empty: bool = False) -> list[Record]:
    """Load and validate rows from a .jsonl file, a .parquet file, a directory or a Hub data set split.

    ``split`` only matters for a directory: it picks ``forget.jsonl`` / ``retain.jsonl`` or the
    official parquet name (also under ``data/``, as in a SemEval snapshot).
    """
    files = data_files(path, split)
    records: list[Record] = []
    for file in files:
        raws = read_table(file)
        records.extend(validate_row(raw, f"{file} row {index + 1}") for index, raw in enumerate(raws))
    if not records and not allow_empty:
        raise UserError(f"{path}: the {split} set is empty")
    check_unique_ids(records, path)
    return records


def check_unique_ids(records: Iterable[Record], where: str | Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise UserError(f"{where}: duplicate row id {record.id!r}")
        seen.add(record.id)


def content_sha256(path: str | Path) -> str:
    """sha256 of a file, of a directory's files in name order (a data set given as a folder), or of
    the files of a Hub data set split."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else data_files(path)
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_documents(path: str | Path) -> list[str]:
    """MIA member/nonmember files: one object per line with a ``document`` field (official format)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    documents = []
    for index, raw in enumerate(_read_jsonl(path) if path.suffix != ".parquet" else _read_parquet(path)):
        if not isinstance(raw, dict) or not isinstance(raw.get("document"), str):
            raise UserError(f"{path} row {index + 1}: missing string field 'document'")
        documents.append(raw["document"])
    if not documents:
        raise UserError(f"{path}: no documents")
    return documents


def whole_document(row: Record) -> Record:
    """A sentence completion cut after its first word instead of mid-document, so that a loss on the
    answer covers nearly the whole document (as a membership attack reads it); other rows unchanged.

    A sentence completion's prompt is about 80% of its LUME document and no method trains on prompts,
    so forgetting answers only leaves the document's text as recognisable as before (docs/benchmark.md).
    """
    if row.kind != "sc" or " " not in (row.input + " " + row.output).strip():
        return row
    first, rest = (row.input + " " + row.output).split(" ", 1)
    return replace(row, input=first, output=rest)
