"""Data sets as users hold them: a Hub data set split, a SemEval snapshot, an MIA directory.

- ``ORG/NAME[@REVISION]:SPLIT``: a data set repository, resolved like a model (``unlearnlm.hub``,
  offline from the local cache), whose split is found by ``datasets`` (the README's ``configs``, or
  its file-name conventions). Its files are then read and checked like any local rows file.
- A SemEval-2025 Task 4 snapshot root: its parquet files sit under ``data/``
  (``forget_train-00000-of-00001.parquet``, ...); ``records.load_records`` looks there.
- An MIA directory: ``member.jsonl`` and ``nonmember.jsonl`` side by side, as the organizers'
  ``--mia_data_path`` held them.
"""

from __future__ import annotations

import re
from pathlib import Path

from unlearnlm.errors import UserError

MIA_FILES = {"members": "member.jsonl", "nonmembers": "nonmember.jsonl"}
_HUB_SPLIT = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?:(?P<split>[\w.-]+)")


def parse_hub_split(spec: str | Path) -> tuple[str, str | None, str] | None:
    """``ORG/NAME[@REVISION]:SPLIT`` -> ``(repo_id, revision, split)``; None for anything else."""
    match = _HUB_SPLIT.fullmatch(str(spec))
    return (match["repo"], match["revision"], match["split"]) if match else None


def hub_split_files(spec: str) -> list[Path]:
    """The local files of a Hub data set's split, from the cache when ``HF_HUB_OFFLINE`` is set."""
    from unlearnlm.hub import snapshot

    repo_id, revision, split = parse_hub_split(spec)
    folder, _ = snapshot(repo_id, revision, repo_type="dataset")
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder))
    except Exception as err:  # datasets raises many types for a folder it cannot make sense of
        raise UserError(f"{spec}: datasets cannot read {folder} ({str(err).splitlines()[0]})") from None
    splits = builder.config.data_files or {}
    if split not in splits:
        raise UserError(f"{spec}: no split {split!r} (the data set has {', '.join(sorted(splits)) or 'none'})")
    return [Path(file) for file in splits[split]]


def mia_file(path: str | Path, role: str) -> Path:
    """A members / nonmembers argument: a file, or a directory holding ``member.jsonl`` / ``nonmember.jsonl``."""
    path = Path(path)
    if path.is_dir():
        path = path / MIA_FILES[role]
        if not path.is_file():
            raise UserError(f"{path}: no such file (an MIA directory holds {' and '.join(MIA_FILES.values())})")
    return path
