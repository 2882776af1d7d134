"""AGAD's phases as the authors' code runs them, against unlearnlm's ``agad`` schedule.

Runs the authors' ``AlternatingTrainer`` (iraklis07/llm-unlearning, ``methods/alternating.py``),
imported from a checkout given on the command line, on a small target, and records every phase it
trains: its kind (forgetting or annealing) and the ids of its rows. Then builds unlearnlm's ``agad``
schedule for the same sets and the same seed, and prints both sequences and whether they agree.

    python scripts/authors_agad_phases.py --authors /path/to/llm-unlearning --model /tmp/micro

As in ``authors_parity.py``, the authors' code is adapted at run time to this transformers only where
an interface changed: ``tokenizer=`` is passed on as ``processing_class=``, and their gradient-ascent
``training_step`` is called without the ``num_items_in_batch`` argument newer ``Trainer``s add and finds
the ``use_apex`` flag (false) they no longer set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of iraklis07/llm-unlearning")
    parser.add_argument("--model", type=Path, required=True, help="a target directory from `unlearnlm target`")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--anneal-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=42, help="the Trainer's seed (their default 42)")
    return parser.parse_args(argv)


def authors_phases(args: argparse.Namespace, data_dir: Path) -> list[tuple[str, list[str]]]:
    sys.path.insert(0, str(args.authors.resolve()))
    from methods import alternating
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from utils.data import DatasetProcessor

    for trainer_class in (alternating.GradientAscentTrainer, Trainer):
        original = trainer_class.__init__

        def init(self, *positional, tokenizer=None, _original=original, **keywords):
            _original(self, *positional, processing_class=tokenizer, **keywords)

        trainer_class.__init__ = init
    ascent_step = alternating.GradientAscentTrainer.training_step
    alternating.GradientAscentTrainer.training_step = (
        lambda self, model, inputs, num_items_in_batch=None: ascent_step(self, model, inputs))
    alternating.GradientAscentTrainer.use_apex = False  # newer Trainers dropped apex and this flag

    recorded: list[tuple[str, list[str]]] = []
    run_phase = alternating.AlternatingTrainer._run_phase

    def recording(self, phase_name, train_args, train_dataset, eval_dataset):
        kind = "forget" if phase_name.endswith("Forgetting") else "anneal"
        recorded.append((kind, list(train_dataset["id"])))
        # Their eval sets carry text columns the collator cannot pad; evaluation plays no part here.
        run_phase(self, phase_name, train_args, train_dataset.select_columns(["input_ids", "attention_mask", "labels"]), None)

    alternating.AlternatingTrainer._run_phase = recording
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = DatasetProcessor(data_dir=str(data_dir), tokenizer=tokenizer)(split="train", task="all", split_tasks=False)
    phase_args = dict(per_device_train_batch_size=4, learning_rate=1e-4, num_train_epochs=1, save_strategy="no",
                      eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=args.seed)
    trainer = alternating.AlternatingTrainer(
        model=model, tokenizer=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        train_args_forgetting=TrainingArguments(output_dir=str(data_dir / "forgetting"), **phase_args),
        train_args_annealing=TrainingArguments(output_dir=str(data_dir / "annealing"), **phase_args),
        retain_dataset=dataset["retain"], forget_dataset=dataset["forget"], chunk_size=args.chunk_size,
        interleaving_factor=1, perform_final_annealing=True, eval_after_annealing=False,
        annealing_fraction=args.anneal_fraction)
    trainer.train()
    return recorded


def our_phases(args: argparse.Namespace, forget_ids: list[str], retain_ids: list[str]) -> list[tuple[str, list[str]]]:
    from unlearnlm.config import load_config
    from unlearnlm.methods import get_method

    config = load_config(None, ["method=agad", f"schedule.chunk_size={args.chunk_size}", f"seed={args.seed}",
                                f"method_args.anneal_fraction={args.anneal_fraction}"])
    method = get_method("agad")
    schedule = method.schedule(len(forget_ids), len(retain_ids), config, method.build_settings(config.method_args), config.seed)
    ids = {"forget": forget_ids, "retain": retain_ids}
    return [("anneal" if "anneal" in phase.name else "forget", [ids[item.role][item.index] for item in phase.items])
            for phase in schedule]


def main(argv: list[str] | None = None) -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from authors_parity import write_parquet

    args = parse_args(argv)
    rows = {split: [json.loads(line)["id"] for line in (args.model / "benchmark" / f"{split}.jsonl").read_text().splitlines()
                    if line.strip()] for split in ("forget", "retain")}
    with tempfile.TemporaryDirectory() as data_dir:
        write_parquet(args.model / "benchmark", Path(data_dir))
        theirs = authors_phases(args, Path(data_dir))
    ours = our_phases(args, rows["forget"], rows["retain"])
    position = {name: index for split in rows.values() for index, name in enumerate(split)}
    for label, phases in (("theirs", theirs), ("ours", ours)):
        print(label)
        for kind, ids in phases:
            # Row numbers within their set; the order inside a phase is shuffled by the trainer anyway.
            print(f"  {kind:6s} {sorted(position[name] for name in ids)}")
    same = [(kind, sorted(ids)) for kind, ids in theirs] == [(kind, sorted(ids)) for kind, ids in ours]
    print("same phases and rows:", same)
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
