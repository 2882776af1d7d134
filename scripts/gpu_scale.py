"""Speed and memory of the SemEval winners' recipes on the real OLMo architectures, without a download.

Builds randomly initialised OLMo-1B / OLMo-7B models (the 0724 checkpoints' shapes: the compute and
memory of a step do not depend on the weights' values), trains them through the project's Engine
with the SUGD presets on real LUME rows for a fixed number of steps, and reports tokens per second,
seconds per chunk, peak GPU memory and the projected time of a whole run.

The prepared command for one H100 (estimated at about 5 minutes, most of it the 7B variants; not yet timed):

    python scripts/gpu_scale.py --arch olmo-1b olmo-7b --steps 30 --json-out gpu_scale.json

On a CPU, ``--arch tiny`` runs the same path on a tiny OLMo in seconds (the test does).

Variants: ``layers`` (the arch's layer-focused preset: olmo-7b-sugd trains the last 8 of 32 layers
with the embeddings and the LM head, olmo-1b-sugd-ours the last 4 of 16) and ``lora`` (olmo-7b-sugd-lora: r 16 on q/v/up/down, batch 16),
each also with gradient checkpointing (``+gc``). Text is tokenized with a byte-level BPE trained
here on the LUME rows; the model keeps OLMo's 50,304-row vocabulary, so the output layer and the
loss cost what they cost with the real tokenizer. The projection multiplies the measured seconds
per optimizer step by the step count of the preset's schedule for ``--forget-rows`` forget rows
(~1,400: the LUME forget set, train and validation), plus one measured checkpoint per chunk.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearnlm.config import UnlearnConfig, load_config
from unlearnlm.data.records import Record, load_records
from unlearnlm.data.sets import bundled_lume_dir
from unlearnlm.data.schedule import optimizer_steps
from unlearnlm.engine import Engine
from unlearnlm.recipe import peak_memory_mb
from unlearnlm.methods import get_method
from unlearnlm.model import DTYPES, apply_trainable

# OlmoConfig keyword arguments. The real ones follow allenai/OLMo-{1B,7B}-0724-hf.
ARCHS: dict[str, dict] = {
    "olmo-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "intermediate_size": 11008, "vocab_size": 50304, "max_position_embeddings": 4096, "clip_qkv": None},
    "olmo-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                "intermediate_size": 8192, "vocab_size": 50304, "max_position_embeddings": 4096, "clip_qkv": 8.0},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 10, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 4096, "clip_qkv": None},
}
# Which preset each variant runs; 'layers' on the tiny model keeps the 7B recipe (last 8 of 10 layers).
LAYER_PRESETS = {"olmo-7b": "olmo-7b-sugd", "olmo-1b": "olmo-1b-sugd-ours", "tiny": "olmo-7b-sugd"}
LORA_PRESET = "olmo-7b-sugd-lora"
VARIANTS = ("layers", "layers+gc", "lora", "lora+gc")
TOKENIZER_VOCAB = 16384  # a BPE trained on ~2,000 rows: long enough merges for realistic lengths
WARMUP_STEPS = 2  # kernel selection and allocator growth, not the steady state


@dataclass
class StepRecord:
    seconds: float
    tokens: int


class TimedEngine(Engine):
    """The Engine, timing each optimizer step (with its real token count) and each checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[StepRecord] = []
        self.checkpoints: list[float] = []

    def _optimizer_step(self, group: list[dict]) -> dict:
        start = time.perf_counter()
        stats = super()._optimizer_step(group)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in group)
        self.steps.append(StepRecord(time.perf_counter() - start, tokens))
        return stats

    def _checkpoint(self, *args) -> None:
        start = time.perf_counter()
        super()._checkpoint(*args)
        self.checkpoints.append(time.perf_counter() - start)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style, like OLMo's) with one EOS token, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(arch: str, dtype: torch.dtype, device: torch.device, eos_id: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, OlmoConfig

    config = OlmoConfig(**ARCHS[arch], eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    # Initialised where it will run: a 7B model filled on the CPU would take minutes.
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def variant_config(arch: str, variant: str, steps: int, device: torch.device) -> tuple[str, UnlearnConfig]:
    preset = LORA_PRESET if variant.startswith("lora") else LAYER_PRESETS[arch]
    overrides = [f"optim.max_steps={steps}", f"gradient_checkpointing={str(variant.endswith('+gc')).lower()}"]
    if device.type == "cpu":
        overrides.append("dtype=float32")  # CPUs emulate bfloat16 matrix products, a hundred times slower
    return preset, load_config(preset, overrides)


def schedule_steps(config: UnlearnConfig, n_forget: int, n_retain: int) -> tuple[int, int, int]:
    """(optimizer steps in all, steps of one full chunk, chunks) of the preset's schedule, one process."""
    method = get_method(config.method)
    phases = method.schedule(n_forget, n_retain, config, method.build_settings(config.method_args), config.seed)
    per_phase = [optimizer_steps(len(p.items), config.optim.batch_size, config.optim.grad_accum) * p.epochs for p in phases]
    return sum(per_phase), per_phase[0], len(phases)


def run_variant(arch: str, variant: str, steps: int, tokenizer, forget: list[Record], retain: list[Record],
                forget_rows: int, device: torch.device) -> dict:
    preset, config = variant_config(arch, variant, steps, device)
    # What the previous variant left behind (should be ~0): the peak below includes it.
    resident_before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(arch, DTYPES[config.dtype], device, tokenizer.eos_token_id)
    model = apply_trainable(model, config.lora, config.layers)
    with tempfile.TemporaryDirectory() as work_dir:
        engine = TimedEngine(model, tokenizer, forget, retain, config, Path(work_dir), show_progress=False)
        summary = engine.run()
        trainable, total = engine.parameter_counts()
    timed = engine.steps[WARMUP_STEPS:] or engine.steps
    seconds_per_step = statistics.mean(step.seconds for step in timed)
    total_steps, chunk_steps, chunks = schedule_steps(config, forget_rows, len(retain))
    checkpoint_s = max(engine.checkpoints)  # the last one holds the optimizer state too
    memory = peak_memory_mb()
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "arch": arch, "variant": variant, "preset": preset, "dtype": config.dtype, "batch_size": config.optim.batch_size,
        "trainable_params": trainable, "total_params": total, "steps": summary.steps, "timed_steps": len(timed),
        "seconds_per_step": seconds_per_step,
        "tokens_per_step": statistics.mean(step.tokens for step in timed),
        "tokens_per_s": sum(step.tokens for step in timed) / sum(step.seconds for step in timed),
        "steps_per_chunk": chunk_steps, "seconds_per_chunk": chunk_steps * seconds_per_step + checkpoint_s,
        "checkpoint_s": checkpoint_s,
        "projected_forget_rows": forget_rows, "projected_chunks": chunks,
        "projected_hours": (total_steps * seconds_per_step + chunks * checkpoint_s) / 3600,
        "peak_gpu_mb": memory.get("peak_gpu_allocated_mb"), "gpu_mb_before": resident_before,
        "peak_rss_mb": memory["peak_rss_mb"],
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SUGD presets on random OLMo weights")
    for column in ("arch", "variant", "trainable", "batch", "s/step", "tokens/s", "s/chunk", "peak GPU GB",
                   "projected h"):
        table.add_column(column, justify="left" if column in ("arch", "variant") else "right")
    for row in results:
        peak = "-" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb'] / 1024:.1f}"
        table.add_row(row["arch"], row["variant"], f"{row['trainable_params'] / 1e6:,.1f}M", str(row["batch_size"]),
                      f"{row['seconds_per_step']:.3f}", f"{row['tokens_per_s']:,.0f}", f"{row['seconds_per_chunk']:,.0f}",
                      peak, f"{row['projected_hours']:.2f}")
    Console(width=140).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["olmo-7b"])
    parser.add_argument("--steps", type=int, default=30, help=f"optimizer steps per variant (the first {WARMUP_STEPS} are not timed)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--forget-rows", type=int, default=1400, help="forget-set size the projection is for")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be above {WARMUP_STEPS}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lume = bundled_lume_dir() / "train"
    forget, retain = load_records(lume / "forget.jsonl", "forget"), load_records(lume / "retain.jsonl", "retain")
    texts = [record.input + " " + record.output for record in forget + retain]
    results = []
    for arch in args.arch:
        tokenizer = train_tokenizer(texts, min(TOKENIZER_VOCAB, ARCHS[arch]["vocab_size"]))
        characters_per_token = sum(map(len, texts)) / sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        print(f"{arch}: {len(tokenizer)} tokens in the tokenizer, {characters_per_token:.2f} characters per token, "
              f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
        for variant in args.variants:
            results.append(run_variant(arch, variant, args.steps, tokenizer, forget, retain, args.forget_rows, device))
            print(json.dumps(results[-1]))
    print_table(results)
    if args.json_out:
        environment = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "steps": args.steps, "warmup_steps": WARMUP_STEPS}
        args.json_out.write_text(json.dumps({"environment": environment, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
