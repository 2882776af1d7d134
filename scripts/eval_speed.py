"""Official (one prompt at a time) against batched generation: speed and parity, in one run.

    python scripts/eval_speed.py --model runs/target/model --forget F.jsonl --retain R.jsonl \
        [--limit 64] [--batch-size 16] [--max-new-tokens 256] [--dtype float32|bfloat16] [--no-regroup]

Prints both wall times and their ratio (and, unless --no-regroup, batched decoding's time without
regrouping the rows still running, for comparison), then the parity of the two modes: the fraction of identical
generations, the largest per-row score difference, and the rows that differ (greedy decoding only
diverges on floating-point near-ties, so on float32 this list should be empty).
"""

from __future__ import annotations

import argparse
import time

from unlearnlm.data.records import load_records
from unlearnlm.data.tokenize import encode_prompt
from unlearnlm.evaluation.evaluator import load_model
from unlearnlm.model import DTYPES
from unlearnlm.evaluation.generation import generate_batched, generate_official
from unlearnlm.evaluation.scoring import official_results, score_rows

SHOWN_DIFFERENCES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--forget", required=True, help="forget rows (.jsonl/.parquet or a directory)")
    parser.add_argument("--retain", required=True, help="retain rows (.jsonl/.parquet or a directory)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows of each split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-regroup", action="store_true", help="batched decoding without regrouping the running rows")
    return parser.parse_args()


def timed(function, *args, **kwargs) -> tuple[list[str], float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model, args.dtype)
    rows = [(record, "forget") for record in load_records(args.forget, "forget")[: args.limit]]
    rows += [(record, "retain") for record in load_records(args.retain, "retain")[: args.limit]]
    prompts = [encode_prompt(tokenizer, record.input) for record, _ in rows]
    print(f"{len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, dtype={args.dtype}, device={model.device}")

    official, official_s = timed(generate_official, model, tokenizer, prompts, args.max_new_tokens)
    regroup = {"regroup_after": ()} if args.no_regroup else {}
    batched, batched_s = timed(generate_batched, model, tokenizer, prompts, args.batch_size, args.max_new_tokens, **regroup)
    print(f"official: {official_s:.1f} s   batched (batch size {args.batch_size}): {batched_s:.1f} s   "
          f"speed-up: {official_s / batched_s:.2f}x")
    if not args.no_regroup:
        unregrouped, unregrouped_s = timed(generate_batched, model, tokenizer, prompts, args.batch_size,
                                           args.max_new_tokens, regroup_after=())
        print(f"batched without regrouping: {unregrouped_s:.1f} s (identical to batched: {unregrouped == batched})")

    scored = {}
    for mode, generations in (("official", official), ("batched", batched)):
        scored[mode] = score_rows({"id": record.id, "task": record.task, "split": split, "output": record.output,
                                   "generation": generation} for (record, split), generation in zip(rows, generations))
        print(f"{mode} task aggregate: {official_results(scored[mode])['harmonic-mean-task-aggregate']:.6f}")
    differing = [(a, b) for a, b in zip(scored["official"], scored["batched"]) if a["generation"] != b["generation"]]
    max_difference = max((abs(a["score"] - b["score"]) for a, b in zip(scored["official"], scored["batched"])), default=0.0)
    print(f"identical generations: {1 - len(differing) / len(rows):.4f} ({len(rows) - len(differing)}/{len(rows)})   "
          f"max score difference: {max_difference:.6f}")
    for a, b in differing[:SHOWN_DIFFERENCES]:
        print(f"  {a['id']}: official={a['generation'][:80]!r}\n  {' ' * len(a['id'])}  batched ={b['generation'][:80]!r}")


if __name__ == "__main__":
    main()
