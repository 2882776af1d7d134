"""Peak memory of unlearning and evaluating one very long raw document (a book-sized deletion request).

    python scripts/long_document_memory.py --megabytes 5 --steps 20 --out /tmp/long-doc

Builds a forget set whose first document is MEGABYTES of LUME text (the bundled retain documents,
repeated and numbered so that no two copies are the same) beside three short forget documents, a
retain set and MIA nonmembers, then runs, each in its own process on a bundled base model (``--base``;
both have a 2,048-token context, so a 5 MB document, 1.75 million tokens, is about 1,140 windows):

- ``unlearnlm unlearn --config gd`` for ``--steps`` optimizer steps (0: the whole run; ``--epochs``
  shortens it);
- ``unlearnlm eval`` with the forget documents as MIA members (regurgitation cuts and the MIA suite).

and prints each command's wall time and peak resident memory (the kernel's ``ru_maxrss`` of the
child). Documents longer than the context are windowed (docs/scoring.md, "Long documents"), so the
peak should not grow with the document's length beyond its token list.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from unlearnlm.bench.base import SHIPPED_BASES
from unlearnlm.data.sets import bundled_lume_dir


def documents(path: Path) -> list[str]:
    with path.open() as handle:
        return [(row := json.loads(line))["input"] + " " + row["output"] for line in handle]


def write_jsonl(path: Path, key: str, texts: list[str]) -> None:
    with path.open("w") as handle:
        for text in texts:
            handle.write(json.dumps({key: text}) + "\n")


def write_sets(out: Path, megabytes: float) -> tuple[Path, Path, Path, Path]:
    lume = bundled_lume_dir() / "train"
    retain, forget = documents(lume / "retain.jsonl"), documents(lume / "forget.jsonl")
    pieces, size, index = [], 0, 0
    while size < megabytes * 1_000_000:
        pieces.append(f"{retain[index % len(retain)]} ({index})")
        size += len(pieces[-1]) + 1
        index += 1
    members = [" ".join(pieces), *forget[:3]]
    paths = out / "forget.jsonl", out / "retain.jsonl", out / "members.jsonl", out / "nonmembers.jsonl"
    write_jsonl(paths[0], "text", members)
    write_jsonl(paths[1], "text", forget[3:15])
    write_jsonl(paths[2], "document", members)
    write_jsonl(paths[3], "document", forget[15:27])
    return paths


def measured(command: list[str], log: Path) -> tuple[int, float, float]:
    """Exit code, seconds and peak resident GiB of ``command`` run alone in a child process."""
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of the unlearning run (0: all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the unlearning run (default: gd's 5)")
    parser.add_argument("--base", choices=("standard", "micro"), default="standard", help="the bundled base model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    forget, retain, members, nonmembers = write_sets(args.out, args.megabytes)
    model = str(SHIPPED_BASES / args.base)
    cli = [sys.executable, "-m", "unlearnlm"]
    limit = ["--set", f"optim.max_steps={args.steps}"] if args.steps else []
    limit += ["--set", f"schedule.epochs_per_chunk={args.epochs}"] if args.epochs else []
    runs = {
        "unlearn": [*cli, "unlearn", "--model", model, "--forget", forget, "--retain", retain, "--config", "gd",
                    "--out", args.out / "unlearned", "--overwrite", *limit],
        "eval": [*cli, "eval", "--model", model, "--forget", forget, "--retain", retain, "--mia-members", members,
                 "--mia-nonmembers", nonmembers, "--out", args.out / "evaluation", "--overwrite"],
    }
    print(f"forget document 1: {forget.stat().st_size / 1e6:.1f} MB of JSONL ({args.megabytes} MB of text)")
    for name, command in runs.items():
        code, seconds, peak = measured([str(part) for part in command], args.out / f"{name}.log")
        print(f"{name}: exit {code}, {seconds:.0f} s, peak resident memory {peak:.2f} GiB (log: {args.out / name}.log)")


if __name__ == "__main__":
    main()
