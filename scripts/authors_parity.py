"""Side-by-side parity: the SUGD authors' own training loop against ``unlearnlm unlearn``.

Runs the authors' ``SequentialUnlearning`` (iraklis07/llm-unlearning, ``methods/sequential.py``: a new
Hugging Face ``Trainer`` per chunk, their interleaved dataset, their loss) and their data processor
(``utils/data.py``) from a checkout given on the command line, imported in place and never copied, and
then ``unlearnlm unlearn`` with the matching settings, on the same model and rows. Prints the largest
weight difference between the two results and scores both with ``unlearnlm eval``.

    python scripts/authors_parity.py --authors /path/to/llm-unlearning --model /tmp/micro --out /tmp/parity

``--model`` is a target built by ``unlearnlm target`` (its ``benchmark/`` rows are used). Needs the
``datasets`` package besides unlearnlm's dependencies. The authors wrote their code for an older
transformers; the adaptations made here at run time, without changing what is computed, are:

- ``Trainer(tokenizer=...)`` became ``processing_class=...``: the keyword is renamed;
- ``Trainer._get_train_sampler`` now receives the dataset: their sequential sampler is called with it;
- ``optim="adamw_torch"``, the default of the transformers of their time (newer ones default to the
  fused AdamW kernel, which rounds differently);
- CPU, float32 and no mixed precision, where their notebooks ran bf16 weights on a GPU (SUGD.ipynb
  with fp16 autocast); the comparison is of the algorithm, not of the hardware.

What trains follows their notebooks (``--variant``): ``main`` (SUGD.ipynb: only the decoder layers
below the last k are frozen), ``experiments`` (SUGD-Experiments.ipynb: the token embeddings and the LM
head are frozen too) or ``lora`` (their LoRA: r 16, alpha 32 on q/v/up/down, merged at the end; both
sides seed 0 before creating the adapters, so they start from the same ones).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

SCORES = ("aggregate-score", "harmonic-mean-task-aggregate", "mia_final_score", "utility", "aggregated-terms")
VARIANTS = {"main": ["embeddings", "final_norm", "lm_head"], "experiments": ["final_norm"], "lora": []}
# The LoRA of their notebooks (SUGD.ipynb, example-notebooks/Sequential.ipynb), peft's default dropout 0.
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of iraklis07/llm-unlearning")
    parser.add_argument("--model", type=Path, required=True, help="a target directory from `unlearnlm target`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="main")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--ratio", type=int, default=3)
    parser.add_argument("--retain-weight", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--last-k", type=int, default=1, help="0: the whole model trains (the demo preset)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=8,
                        help="their collator's padding (8); 1 pads to the longest row only, as unlearnlm does")
    return parser.parse_args(argv)


def write_parquet(rows_dir: Path, data_dir: Path) -> None:
    """The benchmark rows under the SemEval parquet names that the authors' data processor reads."""
    import pandas as pd

    for split in ("forget", "retain"):
        rows = [json.loads(line) for line in (rows_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        frame = pd.DataFrame([{"id": r["id"], "input": r["input"], "output": r["output"], "task": r["task"],
                               "split": split} for r in rows])
        frame.to_parquet(data_dir / f"{split}_train-00000-of-00001.parquet", engine="pyarrow")


def prepare_like_the_notebook(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """LoRA as their notebooks apply it (after seeding as our engine does, so that both draw the same
    initial adapters), or what their notebooks freeze for ``train_last_k``."""
    if args.variant == "lora":
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import set_seed

        set_seed(0)
        return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], bias="none",
                                                target_modules=LORA["target_modules"], task_type=TaskType.CAUSAL_LM))
    freeze_like_the_notebook(model, args.last_k, args.variant)
    return model


def freeze_like_the_notebook(model: torch.nn.Module, last_k: int, variant: str) -> None:
    """What the two notebooks freeze for ``train_last_k``; everything else keeps requires_grad."""
    if last_k == 0:
        return
    layers = model.model.layers
    for index, layer in enumerate(layers):
        layer.requires_grad_(index >= len(layers) - last_k)
    if variant == "experiments":
        model.model.embed_tokens.requires_grad_(False)
        model.lm_head.requires_grad_(False)


def adapt_to_this_transformers(sequential) -> None:
    trainer_init = sequential.AscentPlusDescentTrainer.__init__

    def init(self, *positional, tokenizer=None, **keywords):
        trainer_init(self, *positional, processing_class=tokenizer, **keywords)

    sequential.AscentPlusDescentTrainer.__init__ = init
    sequential.AscentPlusDescentTrainer._get_train_sampler = (
        lambda self, dataset=None: torch.utils.data.SequentialSampler(dataset if dataset is not None else self.train_dataset))


def authors_trainer(args: argparse.Namespace, data_dir: Path, out: Path, model: torch.nn.Module):
    from methods import sequential
    from transformers import AutoTokenizer, TrainingArguments
    from utils.data import DatasetProcessor

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = DatasetProcessor(data_dir=str(data_dir), tokenizer=tokenizer)(split="train", task="all", split_tasks=False)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, num_train_epochs=args.epochs, save_strategy="no", eval_strategy="no", report_to="none",
        optim="adamw_torch", use_cpu=True, disable_tqdm=True, logging_steps=1000)
    trainer = sequential.SequentialUnlearning(
        model=model, tokenizer=tokenizer,
        data_collator=sequential.AscentPlusDescentDataCollator(
            tokenizer=tokenizer, padding="longest", pad_to_multiple_of=args.pad_to_multiple_of),
        training_args=training_args, forget_dataset=dataset["forget"], retain_dataset=dataset["retain"], sequential=True,
        chunk_size=args.chunk_size, positive_ratio=args.ratio, positive_factor=args.retain_weight, retain_loss="CE")
    return trainer, tokenizer


def run_authors(args: argparse.Namespace, data_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = prepare_like_the_notebook(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args)
    trainer, tokenizer = authors_trainer(args, data_dir, out, model)
    trainer.train(split_retain=True)
    if args.variant == "lora":
        model = model.merge_and_unload()
    model.save_pretrained(out / "authors")
    tokenizer.save_pretrained(out / "authors")


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    return dict(zip([name for name, _ in named], torch.autograd.grad(loss, [parameter for _, parameter in named])))


def first_batch_gradients(args: argparse.Namespace, data_dir: Path, out: Path) -> dict:
    """The gradient of every weight on the first batch of the first chunk, by their loss and by ours,
    before any optimizer step: what the two loops compute, without AdamW in between."""
    from methods import sequential
    from transformers import AutoModelForCausalLM

    from accelerate.utils import set_seed

    from unlearnlm.data.records import load_records
    from unlearnlm.engine import Engine
    from unlearnlm.model import apply_trainable

    theirs_model = prepare_like_the_notebook(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args)
    trainer, tokenizer = authors_trainer(args, data_dir, out, theirs_model)
    chunk = trainer.forget_dataset.select(range(min(args.chunk_size, len(trainer.forget_dataset))))
    retain, _ = trainer._get_cycled_retain_samples(trainer.retain_dataset, len(chunk) * args.ratio, 0)
    rows = sequential.AdvSupervisedDataset(chunk, retain, positive_ratio=args.ratio, positive_factor=args.retain_weight)
    batch = trainer.data_collator([rows[index] for index in range(min(args.batch_size, len(rows)))])
    theirs_loss = sequential.AscentPlusDescentTrainer.compute_loss(None, theirs_model, batch)
    theirs = gradients(theirs_model, theirs_loss)

    config = our_config(args)
    set_seed(config.seed)
    ours_model = apply_trainable(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                                 config.lora, config.layers)
    samples = args.model / "benchmark"
    engine = Engine(ours_model, tokenizer, load_records(samples / "forget.jsonl"),
                    load_records(samples / "retain.jsonl", "retain"), config, out / "engine", show_progress=False)
    ours_batch = engine._local_batches(engine._phase_items(0, 0), engine._global_batch(engine.phases[0]))[0]
    logits = engine.model(**engine._model_inputs(ours_batch)).logits
    ours_loss, _ = engine.method.loss(logits, ours_batch, engine.settings, None)
    ours = gradients(ours_model, ours_loss)
    assert ours.keys() == theirs.keys(), "the two loops train different weights"
    largest = max(gradient.abs().max().item() for gradient in theirs.values())
    difference = max((ours[name] - theirs[name]).abs().max().item() for name in theirs)
    return {"loss_theirs": theirs_loss.item(), "loss_ours": ours_loss.item(), "max_abs_gradient": largest,
            "max_abs_gradient_difference": difference, "relative": difference / largest}


def our_config(args: argparse.Namespace, micro_batches: int = 1):
    from unlearnlm.config import load_config

    outside = ",".join(VARIANTS[args.variant])
    if args.variant == "lora":
        trained = ["lora.enabled=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0",
                   f"lora.target_modules=[{','.join(LORA['target_modules'])}]"]
    else:
        trained = [f"layers.last_k={args.last_k}", f"layers.train_outside=[{outside}]"] if args.last_k else []
    return load_config(None, [
        *trained, "method=sugd", "seed=0", f"method_args.retain_weight={args.retain_weight}", f"schedule.chunk_size={args.chunk_size}",
        f"schedule.ratio={args.ratio}", f"schedule.epochs_per_chunk={args.epochs}", f"optim.lr={args.lr}",
        f"optim.batch_size={args.batch_size // micro_batches}", f"optim.grad_accum={micro_batches}",
        "append_eos=false", "dtype=float32"])


def run_ours(args: argparse.Namespace, out: Path, micro_batches: int = 1) -> None:
    from unlearnlm.recipe import unlearn

    config = our_config(args, micro_batches)
    rows = args.model / "benchmark"
    unlearn(args.model, rows / "forget.jsonl", rows / "retain.jsonl", out, config, show_progress=False)


def difference_stats(first: dict, second: dict, names: list[str]) -> dict:
    difference = torch.cat([(first[name] - second[name]).abs().flatten() for name in names])
    return {"max": difference.max().item(), "median": difference.median().item(),
            "q999": difference.sort().values[int(0.999 * (difference.numel() - 1))].item(),
            "above_1e-5": int((difference > 1e-5).sum()), "above_1e-4": int((difference > 1e-4).sum())}


def compare(args: argparse.Namespace, out: Path) -> dict:
    before, ours, theirs, control = (load_file(str(path / "model.safetensors"))
                                     for path in (args.model, out / "ours", out / "authors", out / "ours-2-micro-batches"))
    shared = sorted(set(ours) & set(theirs))
    moved = [name for name in shared if not torch.equal(ours[name], before[name])]
    update = torch.cat([(ours[name] - before[name]).abs().flatten() for name in moved])
    rows = args.model / "benchmark"
    subprocess.run([sys.executable, "-m", "unlearnlm", "eval", "--model", str(out / "ours"), "--model", str(out / "authors"),
                    "--forget", str(rows / "forget.jsonl"), "--retain", str(rows / "retain.jsonl"),
                    "--mia-members", str(rows / "mia_members.jsonl"), "--mia-nonmembers", str(rows / "mia_nonmembers.jsonl"),
                    "--utility", str(rows / "general.jsonl"), "--out", str(out / "eval")], check=True)
    # AdamW divides each update by the root of its running squared gradient, so a weight whose gradient
    # is near zero moves by a good part of the learning rate in a direction that rounding can flip: the
    # largest differences sit on a few such weights. The control, our own run again with each batch
    # cut into two accumulated micro-batches (the same mean, summed in another order), shows the size
    # of that effect with no change of algorithm.
    return {"variant": args.variant, "pad_to_multiple_of": args.pad_to_multiple_of, "tensors_compared": len(shared),
            "tensors_moved": len(moved), "weights_moved": update.numel(),
            "weight_difference": difference_stats(ours, theirs, moved),
            "control_ours_vs_ours_in_2_micro_batches": difference_stats(ours, control, moved),
            "weight_update": {"max": update.max().item(), "median": update.median().item()},
            "scores": {name: {key: results[key] for key in SCORES} for name, results in (
                (name, json.loads((out / "eval" / name / "evaluation_results.json").read_text())) for name in ("ours", "authors"))}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=False)
    sys.path.insert(0, str(args.authors.resolve()))
    from methods import sequential

    adapt_to_this_transformers(sequential)
    with tempfile.TemporaryDirectory() as data_dir:
        write_parquet(args.model / "benchmark", Path(data_dir))
        gradients = first_batch_gradients(args, Path(data_dir), args.out)
        run_authors(args, Path(data_dir), args.out)
    run_ours(args, args.out / "ours")
    run_ours(args, args.out / "ours-2-micro-batches", micro_batches=2)
    report = {"first_batch_gradients": gradients, **compare(args, args.out)}
    (args.out / "parity.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
