"""The `unlearnlm` command line: target, unlearn, eval, level, demo, bench, audit, ledger."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from unlearnlm.bench.sizes import SIZES, get_size
from unlearnlm.boundary import guarded
from unlearnlm.errors import UserError
from unlearnlm.kernels import pin_kernels
from unlearnlm.ledger.commands import ledger_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Remove chosen data from a language model and measure, with the SemEval-2025 metrics, that it is gone.",
)


# --- target ------------------------------------------------------------------------------------------

# Options several commands share, written once.
ForgetRows = Annotated[Path, typer.Option(
    help="Forget rows: a .jsonl or .parquet file, a directory (forget.jsonl, or a SemEval snapshot with data/*.parquet), or "
         "a Hub split ORG/NAME[@REV]:SPLIT.")]
RetainRows = Annotated[Path, typer.Option(
    help="Retain rows: a .jsonl or .parquet file, a directory (retain.jsonl, or a SemEval snapshot with data/*.parquet), or "
         "a Hub split ORG/NAME[@REV]:SPLIT.")]
MiaMembers = Annotated[Optional[Path], typer.Option(
    help="MIA members: a {document} jsonl, a directory with member.jsonl, or rows (sc rows used).")]
MiaNonmembers = Annotated[Optional[Path], typer.Option(
    help="MIA nonmembers: a {document} jsonl, a directory with nonmember.jsonl, or rows.")]


# The choices of --size, from the benchmark's one size table.
TargetSize = Enum("TargetSize", {name: name for name in SIZES}, type=str)


class TargetArch(str, Enum):
    llama = "llama"
    olmo = "olmo"


@app.command("target")
def target_command(
    data: Annotated[Path, typer.Option(help="LUME-format directory (train/ and validation/ forget.jsonl, retain.jsonl).")],
    out: Annotated[Path, typer.Option(help="Output model directory (must be empty unless --overwrite).")],
    size: Annotated[TargetSize, typer.Option(help="Documents per set and model size.")] = TargetSize.mini,
    seed: Annotated[int, typer.Option(help="Seed of the document draw and of the model.")] = 0,
    draw: Annotated[int, typer.Option(
        min=0, help="Which disjoint draw of documents (the benchmark tunes on 1, reports on 0).")] = 0,
    arch: Annotated[TargetArch, typer.Option(help="Decoder architecture from transformers.")] = TargetArch.llama,
    max_epochs: Annotated[Optional[int], typer.Option(min=1, help="Epoch budget (default: the size's own).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads; more than 1 pays only on an idle machine.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Fine-tune a small pretrained base until it memorized LUME documents (the target, at OUT) and
    retrain it without the forget set (the oracle, at OUT/oracle); both are calibrated."""
    from unlearnlm.data.sets import draw_sets
    from unlearnlm.paths import claim_output

    # Bad input fails before torch is imported.
    claim_output(out, overwrite, inputs=[data])
    chosen = SIZES[size.value]
    draw_sets(data, chosen.sets, seed, draw)

    from rich.console import Console

    from unlearnlm.bench.target import build_target

    log = build_target(data, out, chosen, seed, arch.value, draw, overwrite, max_epochs, threads=threads)
    base, target, oracle = log["base"], log["target"], log["oracle"]
    Console().print(
        f"base: {base['directory']} ({'built' if base['built'] else 'reused'})\n"
        f"target: {out}  ({log['parameters']:,} parameters, {target['epochs']} epochs, {target['train_seconds']:.0f}s, "
        f"{target['rows_recalled']}/{target['rows']} rows recalled)\n"
        f"oracle: {out / 'oracle'}  ({oracle['steps']} steps, {oracle['train_seconds']:.0f}s)\n"
        f"calibration passed; scores and losses in {out / 'benchmark' / 'manifest.json'}\n"
        f"unseen documents for --config auto --unseen: {out / 'benchmark' / 'unseen.jsonl'}"
    )


@app.command("base")
def base_command(
    out: Annotated[Path, typer.Option(help="Output model directory (must be empty unless --overwrite).")],
    data: Annotated[Optional[Path], typer.Option(help="LUME-format directory (default: the bundled copy).")] = None,
    size: Annotated[TargetSize, typer.Option(help="The target size whose base to pretrain.")] = TargetSize.mini,
    arch: Annotated[TargetArch, typer.Option(help="Decoder architecture from transformers.")] = TargetArch.llama,
    bfloat16: Annotated[bool, typer.Option(help="Store the weights in bfloat16 (the copy shipped in the package).")] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads; more than 1 pays only on an idle machine.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Pretrain the small base model on the pool of a LUME-format directory (`target` does it when needed)."""
    from unlearnlm.paths import claim_output

    claim_output(out, overwrite)

    from unlearnlm.bench.base import build_base

    log = build_base(data, out, SIZES[size.value], arch.value, overwrite, threads=threads, shipped=bfloat16)
    print(f"base: {out}  ({log['parameters']:,} parameters, {log['epochs']} epochs on {log['pool_tokens']:,} tokens, "
          f"{log['train_seconds']:.0f}s; weights sha256 {log['weights_sha256']})")


# --- eval --------------------------------------------------------------------------------------------

class EvalDType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@app.command("eval")
def eval_command(
    model: Annotated[list[str], typer.Option("--model", help="Model directory, LoRA adapter directory or Hub id "
                                                            "ORG/NAME[@REVISION]; repeat to compare several models.")],
    forget: ForgetRows,
    retain: RetainRows,
    out: Annotated[Path, typer.Option(help="Output directory (must be empty unless --overwrite).")],
    mia_members: MiaMembers = None,
    mia_nonmembers: MiaNonmembers = None,
    utility: Annotated[Optional[Path], typer.Option(help="General set G (rows): the utility score, an MMLU stand-in.")] = None,
    mmlu: Annotated[Optional[Path], typer.Option(help="Local MMLU directory (dev/, test/ CSVs or cais/mmlu parquet).")] = None,
    mmlu_shots: Annotated[int, typer.Option(min=0, help="In-context examples per MMLU prompt.")] = 5,
    official: Annotated[bool, typer.Option(help="One prompt at a time, as the organizers ran it (bfloat16).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for batched generation and scoring.")] = 16,
    dtype: Annotated[Optional[EvalDType], typer.Option(help="[default: bfloat16 with --official, else float32]")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy generation length limit.")] = 256,
    redact: Annotated[bool, typer.Option(help="Mask forget answers and generations in the summary.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer directory or Hub id, when not the model's own.")] = None,
    text_key: Annotated[str, typer.Option(help="The text field of raw-document rows.")] = "text",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Score models with the official SemEval-2025 Task 4 metrics (plus the MIA suite, utility, MMLU)."""
    from rich.console import Console
    from rich.progress import Progress

    from unlearnlm.api import evaluate_models
    from unlearnlm.distributed import join_launched_processes
    from unlearnlm.evaluation.report import results_table, terms_table

    console = Console()
    main = join_launched_processes()  # launched on several processes: each scores its share of the rows
    with Progress(console=console, transient=True, disable=not main) as progress:
        named_results = evaluate_models(
            model, forget, retain, out, tokenizer=tokenizer, members=mia_members, nonmembers=mia_nonmembers,
            general=utility, mmlu=mmlu, mmlu_shots=mmlu_shots, official=official, batch_size=batch_size,
            dtype=dtype.value if dtype else None, max_new_tokens=max_new_tokens, redact=redact, text_key=text_key,
            overwrite=overwrite, reporter=_eval_progress(progress))
    if not main:
        return  # every process holds the gathered results; one printed them
    console.print(results_table(named_results))
    console.print(terms_table(named_results))
    for name, results in named_results:
        if results.get("mmlu", {}).get("below_threshold"):
            console.print(f"[yellow]{name}: MMLU is below 0.371, the threshold of the 7B leaderboard[/yellow]")
    console.print(f"results written to {out}")


def _eval_progress(progress):
    """A reporter factory for ``evaluate_paths``: one progress bar per (model, phase)."""
    bars: dict[tuple[str, str], object] = {}

    def for_model(name: str):
        def advance(phase: str, done: int, total: int) -> None:
            if (name, phase) not in bars:
                bars[name, phase] = progress.add_task(f"{name}: {phase}", total=total)
            progress.advance(bars[name, phase], done)

        return advance

    return for_model



# --- unlearn -----------------------------------------------------------------------------------------


@app.command()
def unlearn(
    model: Annotated[str, typer.Option(help="Input model: a directory (Hugging Face format, safetensors), a LoRA "
                                           "adapter directory or a Hub id ORG/NAME[@REVISION]. Only read.")],
    forget: ForgetRows,
    retain: RetainRows,
    out: Annotated[Path, typer.Option(help="Output directory (written to a temporary directory, renamed at the end).")],
    config: Annotated[Optional[str], typer.Option(
        help="YAML config file or preset name (see `unlearnlm presets`); 'auto' calibrates itself on the model "
             "and needs --unseen.")] = None,
    unseen: Annotated[Optional[Path], typer.Option(
        help="With --config auto: documents of the forget set's kind the model was not fine-tuned on ({text}, "
             "{document} or SemEval rows); part sets the level, the rest checks the result.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Method name; shorthand for --set method=NAME.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a setting, e.g. --set optim.lr=5e-5 (repeatable).")] = None,
    save: Annotated[Optional[str], typer.Option(help="'merged' (default) or 'adapter' (LoRA only).")] = None,
    val_forget: Annotated[Optional[Path], typer.Option(
        help="Validation forget set: with --val-retain, enables checkpoint selection. The default metric, the "
             "final score, also needs --val-members, --val-nonmembers and --val-general "
             "(or --set validation.metric=task_aggregate).")] = None,
    val_retain: Annotated[Optional[Path], typer.Option(help="Validation retain set.")] = None,
    val_members: Annotated[Optional[Path], typer.Option(help="Validation MIA members (as --mia-members of eval).")] = None,
    val_nonmembers: Annotated[Optional[Path], typer.Option(
        help="Validation MIA nonmembers (as --mia-nonmembers of eval).")] = None,
    val_general: Annotated[Optional[Path], typer.Option(help="Validation general set for the utility score.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer directory or Hub id, when not the model's own.")] = None,
    text_key: Annotated[str, typer.Option(help="The text field of raw-document rows (forgotten whole).")] = "text",
    redact: Annotated[bool, typer.Option(help="Keep data file names and model paths out of the model card.")] = False,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Publish the saved model to this Hub repository ORG/NAME.")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create the repository private.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last chunk checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Unlearn the forget set from a model (SUGD by default) and save the result."""
    from unlearnlm.api import unlearn as run_unlearning
    from unlearnlm.distributed import join_launched_processes

    overrides = list(set_ or [])
    if method:
        overrides.append(f"method={method}")
    if save:
        overrides.append(f"save={save}")
    for name, value in (("forget", val_forget), ("retain", val_retain), ("members", val_members),
                        ("nonmembers", val_nonmembers), ("general", val_general)):
        if value is not None:
            overrides.append(f"validation.{name}={value}")
    report = run_unlearning(model, forget, retain, out, config, unseen=unseen, overrides=overrides, tokenizer=tokenizer,
                            text_key=text_key, resume=resume, overwrite=overwrite, redact=redact,
                            push_to_hub=push_to_hub, private=private)
    if join_launched_processes():  # one summary per run, not one per process
        _print_run_summary(report, out)


def _print_run_summary(report: dict, out: Path) -> None:
    """What the run did, on stderr: how it stopped, the kept state, auto's verdict, where it went."""
    from rich.console import Console

    console = Console(stderr=True)
    style = "yellow" if report["stopped_reason"] != "completed" else "green"
    console.print(f"[{style}]{report['stopped_reason']}[/]: {report['steps']} steps in {report['wall_seconds']:.1f}s, "
                  f"{report['trainable_parameters']:,} trainable parameters -> {out}")
    if report["best"] and "verdict" not in report:
        best, metric = report["best"], report["config"]["validation"]["metric"]
        console.print(f"kept the best validated state: {best['phase']} (step {best['step']}), "
                      f"{metric}={best[metric]:.4f}")
    if "verdict" in report:
        verdict = report["verdict"]
        console.print(f"[{'green' if verdict['forgotten'] else 'yellow'}]{verdict['summary']}[/]")
        for tip in verdict.get("advice", []):
            console.print(f"  to try: {tip}")
    if "pushed" in report:
        console.print(f"published: {report['pushed']}")


@app.command("level")
def level_command(
    model: Annotated[str, typer.Option(help="The model before unlearning: a directory, an adapter or a Hub id. Only read.")],
    documents: Annotated[Path, typer.Option(
        help="Text the model saw only in pretraining, in no evaluation set: a {document} jsonl, a directory with "
             "nonmember.jsonl, or rows.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for scoring.")] = 16,
    text_key: Annotated[str, typer.Option(help="The text field of raw-document rows.")] = "text",
) -> None:
    """Print the model's mean loss per token on DOCUMENTS: the level to forget up to (method_args.forget_ceiling)
    or to hold forgotten documents at (method_args.forget_target)."""
    from unlearnlm.evaluation.evaluator import load_model
    from unlearnlm.evaluation.inputs import load_mia_documents
    from unlearnlm.evaluation.mia import mean_document_loss
    from unlearnlm.hub import resolve_model

    source = resolve_model(model)  # checked, as the documents are, before any weights load
    texts = load_mia_documents(documents, "nonmembers", text_key)
    loaded, tokenizer = load_model(source)
    level = mean_document_loss(loaded, tokenizer, texts, batch_size)
    typer.echo(f"{level:.4f}")
    typer.echo(f"{len(texts)} documents; unlearn with --set method_args.forget_ceiling={level:.4f}", err=True)


@app.command()
def presets() -> None:
    """List the configuration presets shipped with unlearnlm."""
    from unlearnlm.config import PRESET_DIR, preset_names

    # Each preset's header: a one-line summary, then a line naming where its values come from.
    for name in preset_names():
        header = [line.lstrip("# ") for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        print(f"{name:26s} {header[0]}")
        print(f"{'':26s} {next(line for line in header if line.startswith('Source:'))}")


@app.command()
def methods() -> None:
    """List the registered unlearning methods."""
    from unlearnlm.methods import REGISTRY

    for name, entry in sorted(REGISTRY.items()):
        print(f"{name:8s} {entry.summary}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its models and reports.")] = Path("unlearnlm-demo"),
    size: Annotated[str, typer.Option(help="Size preset of the target and oracle.")] = "mini",
    seed: Annotated[int, typer.Option(help="Seed of the target and the document draw.")] = 0,
    config: Annotated[str, typer.Option(
        help="Unlearning preset or YAML file; auto (the default) calibrates itself on the target's unseen documents.")] = "auto",
    redact: Annotated[bool, typer.Option(help="Mask forget-set answers in printed tables and reports.")] = False,
) -> None:
    """Build (or reuse) a tiny memorized target and its oracle, unlearn it (--config auto), and print the scores
    of the base, target, oracle and unlearned model."""
    from unlearnlm.bench.base import cache_root
    from unlearnlm.config import load_config
    from unlearnlm.demo import claim_demo_dir, run_demo
    from unlearnlm.paths import refuse_overlap

    # Checked, and the output locked, before the demo touches it or starts building a target.
    load_config(config)
    chosen = get_size(size)
    refuse_overlap(out, [cache_root()])
    claim_demo_dir(out)
    run_demo(out, size=chosen, seed=seed, config=config, redact=redact)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(
        help="Output directory for results.json, report.md and the plots.")] = Path("unlearnlm-bench"),
    size: Annotated[str, typer.Option(help="Size preset of the targets (bench: the benchmark; micro: a smoke run).")] = "bench",
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", help="Method variant to run (repeatable; default all).")] = None,
    grid: Annotated[str, typer.Option(help="Learning-rate multipliers tried per method on the tuning draw, comma-separated; "
                                              "one value: no tuning, no tuning draw (a quick run).")] = "0.5,1,2",
    seeds: Annotated[str, typer.Option(
        help="Unlearning seeds on the reported draw, comma-separated (mean and spread). A seed changes LoRA's "
             "initialization and shuffled orders only; other runs repeat to the last digit.")] = "0",
    target_seed: Annotated[int, typer.Option(help="Seed of the targets and the document draws.")] = 0,
    time_budget: Annotated[Optional[float], typer.Option(help="Seconds of unlearning allowed per run.")] = None,
    trajectory: Annotated[bool, typer.Option(
        "--trajectory/--no-trajectory", help="Log validation scores after every chunk of the SUGD run.")] = True,
    audit: Annotated[bool, typer.Option(
        "--audit/--no-audit",
        help="Attack each method's first-seed model and the oracle (unlearnlm audit's attacks): the robust final.")] = True,
    jobs: Annotated[int, typer.Option(
        min=1, help="Processes running methods side by side (each gets cores / jobs threads).")] = 1,
    draws: Annotated[int, typer.Option(
        min=1, help="Reported draws: each its own target and oracle (target seeds TARGET_SEED, TARGET_SEED + 1, ...); "
                    "the means, intervals and tie groups are over them.")] = 3,
    audit_draws: Annotated[int, typer.Option(
        min=1, help="How many of the reported draws (the first ones) are attacked for the robust final.")] = 1,
) -> None:
    """Compare every method on the tiny LUME benchmark with equal tuning effort; write tables and plots."""
    from unlearnlm.bench.base import cache_root
    from unlearnlm.bench.run import BenchOptions, run_bench
    from unlearnlm.paths import claim_place, refuse_overlap

    try:
        grid_values = [float(x) for x in grid.split(",") if x.strip()]
        seed_values = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError("--grid takes numbers and --seeds integers, comma-separated") from None
    if not grid_values or not seed_values:
        raise UserError("--grid and --seeds need at least one value each")
    if any(value <= 0 for value in grid_values):
        raise UserError("--grid multiplies learning rates: its values must be positive")
    refuse_overlap(out, [cache_root()])
    claim_place(out)  # here, once: the workers of --jobs write into the same output under this lock
    run_bench(BenchOptions(out=out, size=size, methods=list(method or []), grid=grid_values, seeds=seed_values,
                           target_seed=target_seed, time_budget_s=time_budget, trajectory=trajectory, audit=audit,
                           jobs=jobs, draws=draws, audit_draws=audit_draws))


@app.command("audit")
def audit_command(
    model: Annotated[Path, typer.Option(help="The unlearned model to audit: a directory, an adapter or a Hub id. Only read.")],
    forget: ForgetRows,
    retain: RetainRows,
    out: Annotated[Path, typer.Option(help="Output directory for receipt.json, receipt.md and the plot.")],
    original: Annotated[Optional[Path], typer.Option(
        help="The model before unlearning: its scores and weight hashes go in the receipt.")] = None,
    oracle: Annotated[Optional[Path], typer.Option(
        help="A model that never saw the forget set: every attack runs on it too.")] = None,
    mia_members: MiaMembers = None,
    mia_nonmembers: MiaNonmembers = None,
    utility: Annotated[Optional[Path], typer.Option(help="General set G (rows): the utility score.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the T/V split, the relearning and the sampling.")] = 0,
    relearn_steps: Annotated[int, typer.Option(min=1, help="Fine-tuning steps of each relearning attack.")] = 30,
    relearn_lr: Annotated[float, typer.Option(
        help="Learning rate of full relearning (LoRA: 5x); 2e-4 suits the tiny targets, ~1e-5 a 7B model.")] = 2e-4,
    samples: Annotated[int, typer.Option(min=1, help="Samples per prompt in the sampling attack.")] = 8,
    quantizer: Annotated[str, typer.Option(
        help="Library of the quantization attacks: torchao (round-to-nearest, runs anywhere), bitsandbytes "
             "(LLM.int8 and NF4; pip install 'unlearnlm[bnb]'), or auto: bitsandbytes on a CUDA GPU when "
             "installed, else torchao.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for generation and scoring.")] = 16,
    sampling_batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Rows per batch of the sampled attack (a prompt's samples share its length); "
                    "default: four times --batch-size.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit.")] = 256,
    redact: Annotated[bool, typer.Option(
        "--redact/--no-redact", help="Keep forget prompts, answers and generations out of the receipt.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Attack an unlearned model (relearning, quantization, extraction) and write a deletion receipt."""
    from unlearnlm.hub import resolve_model
    from unlearnlm.paths import claim_output

    # A Hub id becomes its snapshot directory, which the receipt hashes like any model directory.
    model, original, oracle = (None if spec is None else resolve_model(spec).path for spec in (model, original, oracle))
    inputs = {"model": model, "forget": forget, "retain": retain, "original": original, "oracle": oracle,
              "mia_members": mia_members, "mia_nonmembers": mia_nonmembers, "general": utility}
    claim_output(out, overwrite, inputs=list(inputs.values()))
    data = _audit_data(forget, retain, mia_members, mia_nonmembers, utility)
    settings = _audit_settings(data, seed, relearn_steps, relearn_lr, samples, quantizer, batch_size,
                               sampling_batch_size, max_new_tokens)

    from rich.console import Console

    from unlearnlm.audit.receipt import RECEIPT_MD, build_receipt, write_receipt
    from unlearnlm.audit.run import run_audit
    from unlearnlm.runstate import finalize_output, prepare_output

    console = Console(stderr=True)
    audit = run_audit(model, data, original, oracle, settings, log=console.print)
    work = prepare_output(out, [path for path in inputs.values() if path is not None], False, overwrite)
    receipt = build_receipt(audit, inputs, redact)
    write_receipt(receipt, work)
    finalize_output(work, out)
    worst = receipt["worst_case"]
    console.print(f"final {worst['plain']['final']}, robust final {worst['final']} "
                  f"(worst case over {len(receipt['attacks'])} attacks) -> {out / RECEIPT_MD}")


def _audit_settings(data, seed: int, relearn_steps: int, relearn_lr: float, samples: int, quantizer: str,
                    batch_size: int, sampling_batch_size: int | None, max_new_tokens: int):
    """The audit's settings from its flags, checked before any model loads."""
    from dataclasses import replace

    from unlearnlm.audit.attacks import RelearnBudget, SamplingBudget, resolve_quantizer, split_documents
    from unlearnlm.audit.run import AuditSettings
    from unlearnlm.model import default_device

    if not relearn_lr > 0:
        raise UserError(f"--relearn-lr must be positive (got {relearn_lr})")
    split_documents(data.forget, seed)  # fewer than 2 documents fails here
    resolve_quantizer(quantizer, default_device())  # so does a quantizer that cannot run here
    return AuditSettings(seed=seed, relearn=replace(RelearnBudget(), steps=relearn_steps, lr_full=relearn_lr),
                         sampling=replace(SamplingBudget(), samples=samples), batch_size=batch_size,
                         sampling_batch_size=sampling_batch_size, max_new_tokens=max_new_tokens, quantizer=quantizer)


def _audit_data(forget: Path, retain: Path, members: Path | None, nonmembers: Path | None, general: Path | None):
    """The audit's rows and documents (``EvalData``), read and checked before any model loads."""
    from unlearnlm.data.records import load_records
    from unlearnlm.evaluation.evaluator import EvalData
    from unlearnlm.evaluation.inputs import load_general_set, load_mia_documents

    if (members is None) != (nonmembers is None):
        raise UserError("--mia-members and --mia-nonmembers go together")
    return EvalData(load_records(forget, "forget"), load_records(retain, "retain"),
                    load_mia_documents(members, "members") if members else None,
                    load_mia_documents(nonmembers, "nonmembers") if nonmembers else None,
                    load_general_set(general) if general else None)


app.add_typer(ledger_app, name="ledger")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: every command runs inside the one error boundary (unlearnlm.boundary)."""
    pin_kernels()  # before any command imports torch: the same weights on every machine (unlearnlm.kernels)
    sys.exit(guarded(lambda: app(args=argv, prog_name="unlearnlm", standalone_mode=False)))


if __name__ == "__main__":
    main()
