"""What the reference model of KL and NPO costs in memory, next to gradient difference (no reference).

    python scripts/reference_memory.py [--steps 3] [--json-out reference_memory.json]

The project never holds a second model for the reference: with LoRA the reference is the same model
with its adapters switched off; without LoRA its values (KL: the answer tokens' full distributions;
NPO: one log-probability per row) are computed once before training and cached. This script puts
both against a naive second full copy of the original model, built here on purpose, and against
``gd``. Every configuration runs in its own process, so its peak resident memory (ru_maxrss) is its
own; on a GPU the peak allocated device memory is reported as well and the ratios use it.

The model is a random Llama of about 68M parameters (so the model, not the interpreter, dominates),
trained for a few steps on a few real LUME rows through the project's Engine.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROWS = 8  # forget rows, and as many retain rows
MODEL = {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 12,
         "intermediate_size": 2048, "vocab_size": 16384, "max_position_embeddings": 1024, "tie_word_embeddings": False}
TRAINING = ["schedule.chunk_size=null", "schedule.ratio=1", "schedule.epochs_per_chunk=1", "optim.batch_size=2",
            "max_length=128", "optim.lr=1e-5"]
# (setting, method, reference): the naive 'copy' runs the frozen copy on every batch.
RUNS = [(setting, method, reference)
        for setting, own_reference in (("full", "cache"), ("lora", "adapter off"))
        for method, reference in (("gd", "-"), ("kl", own_reference), ("npo", own_reference), ("kl", "copy"), ("npo", "copy"))]


def build_tokenizer(texts: list[str], directory: Path) -> Path:
    from gpu_scale import train_tokenizer  # this directory's sibling script

    path = directory / "tokenizer.json"
    train_tokenizer(texts, MODEL["vocab_size"]).backend_tokenizer.save(str(path))
    return path


def measure(setting: str, method: str, reference: str, steps: int, tokenizer_file: Path) -> dict:
    """One configuration, in this process: build, train ``steps`` steps, report the peaks."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from unlearnlm.config import load_config
    from unlearnlm.data.records import load_records
    from unlearnlm.data.sets import bundled_lume_dir
    from unlearnlm.engine import Engine
    from unlearnlm.model import apply_trainable, count_parameters

    class SecondCopyEngine(Engine):
        """The naive reference: a frozen full copy of the original model, run on every batch."""

        def __init__(self, *args, reference: torch.nn.Module, **kwargs):
            super().__init__(*args, **kwargs)
            self.reference = reference.to(self.accelerator.device).eval().requires_grad_(False)

        def _fill_reference_cache(self) -> None:
            """Nothing to cache: the copy answers every batch."""

        def _reference_values(self, batch: dict):
            with torch.no_grad():
                logits = self.reference(**self._model_inputs(batch)).logits
            return self.method.reference_view(logits, batch["labels"])

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    lume = bundled_lume_dir() / "train"
    forget = load_records(lume / "forget.jsonl", "forget")[:ROWS]
    retain = load_records(lume / "retain.jsonl", "retain")[:ROWS]
    config = load_config(None, TRAINING + [f"method={method}", f"optim.max_steps={steps}",
                                           f"lora.enabled={str(setting == 'lora').lower()}"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL, eos_token_id=0, pad_token_id=0, bos_token_id=None))
    second_copy = copy.deepcopy(model) if reference == "copy" else None
    model = apply_trainable(model, config.lora, config.layers)
    with tempfile.TemporaryDirectory() as work_dir:
        args = (model, tokenizer, forget, retain, config, Path(work_dir))
        engine = SecondCopyEngine(*args, reference=second_copy, show_progress=False) if second_copy is not None \
            else Engine(*args, show_progress=False)
        summary = engine.run()
    cache_bytes = sum(value.numel() * value.element_size() for value in engine.references.logits.values())
    return {
        "setting": setting, "method": method, "reference": reference, "steps": summary.steps,
        "parameters": count_parameters(engine.unwrapped)[1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "reference_cache_mb": cache_bytes / 2**20,
    }


def with_ratios(results: list[dict]) -> list[dict]:
    """Each run against gd with the same trainable parameters (full or LoRA)."""
    key = "peak_gpu_mb" if results[0]["peak_gpu_mb"] is not None else "peak_rss_mb"
    baselines = {row["setting"]: row[key] for row in results if row["method"] == "gd"}
    return [{**row, "ratio_to_gd": row[key] / baselines[row["setting"]],
             "extra_mb": row[key] - baselines[row["setting"]]} for row in results]


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = results[0]["peak_gpu_mb"] is not None
    table = Table(title=f"Peak memory, {results[0]['parameters'] / 1e6:.0f}M-parameter model, {results[0]['steps']} steps")
    for column in ("trainable", "method", "reference", "peak RSS MB", *(("peak GPU MB",) if gpu else ()),
                   "vs gd", "extra MB", "cache MB"):
        table.add_column(column, justify="left" if column in ("trainable", "method", "reference") else "right")
    for row in results:
        table.add_row(row["setting"], row["method"], row["reference"], f"{row['peak_rss_mb']:,.0f}",
                      *((f"{row['peak_gpu_mb']:,.0f}",) if gpu else ()), f"{row['ratio_to_gd']:.2f}x",
                      f"{row['extra_mb']:+,.0f}", f"{row['reference_cache_mb']:.1f}")
    Console().print(table)


def run_all(steps: int) -> list[dict]:
    from unlearnlm.data.records import load_records
    from unlearnlm.data.sets import bundled_lume_dir

    lume = bundled_lume_dir() / "train"
    records = load_records(lume / "forget.jsonl", "forget") + load_records(lume / "retain.jsonl", "retain")
    results = []
    with tempfile.TemporaryDirectory() as directory:
        tokenizer_file = build_tokenizer([r.input + " " + r.output for r in records], Path(directory))
        for setting, method, reference in RUNS:
            command = [sys.executable, __file__, "--worker", setting, method, reference, "--steps", str(steps),
                       "--tokenizer", str(tokenizer_file)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{setting} {method} {reference} failed:\n{done.stderr[-2000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    return with_ratios(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--worker", nargs=3, metavar=("SETTING", "METHOD", "REFERENCE"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.steps, args.tokenizer)))
        return
    results = run_all(args.steps)
    print_table(results)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
