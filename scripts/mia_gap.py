"""The gap an unlearning method must close for the MIA: member and nonmember losses, and the members' answer part.

    python scripts/mia_gap.py TARGET_DIR [UNLEARNED_DIR ...]

TARGET_DIR is a target built by `unlearnlm target` (its `benchmark/` sets are used for every model);
pass its oracle (`TARGET_DIR/oracle`) among the others to see where exact unlearning lands.
For each model it prints the mean token loss of every MIA member and nonmember document (the
official MIA statistic) and of the members' answer tokens alone (the part unlearning trains on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from unlearnlm.data.records import load_documents
from unlearnlm.evaluation.mia import document_statistics
from unlearnlm.model import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="the target first, then unlearned models")
    args = parser.parse_args()
    sets = args.models[0] / "benchmark"
    members, nonmembers = load_documents(sets / "mia_members.jsonl"), load_documents(sets / "mia_nonmembers.jsonl")
    rows = [json.loads(line) for line in (sets / "forget.jsonl").read_text().splitlines()]
    prompt_chars = {row["input"] + " " + row["output"]: len(row["input"]) for row in rows if row["id"][:-1].endswith("sc")}
    for model_dir in args.models:
        model, tokenizer = load_model_and_tokenizer(model_dir)
        member_stats = document_statistics(model, tokenizer, members, with_distribution=False)
        nonmember_stats = document_statistics(model, tokenizer, nonmembers, with_distribution=False)
        answer_losses = []
        for text, stats in zip(members, member_stats):
            # logprobs[t] scores token t + 1, so the answer starts one position before the prompt's length.
            start = len(tokenizer(text[:prompt_chars[text]])["input_ids"]) - 1
            answer_losses.append(float(-stats.logprobs[start:].mean()))
        print(f"{model_dir.name}: members {_fmt([s.mean_loss for s in member_stats])}, "
              f"their answers {_fmt(answer_losses)}, nonmembers {_fmt([s.mean_loss for s in nonmember_stats])}")


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"


if __name__ == "__main__":
    main()
