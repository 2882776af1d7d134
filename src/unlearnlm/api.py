"""The Python API: ``unlearn``, ``evaluate`` and ``load_config``; the command line is a layer over it.

Models are a directory, a LoRA adapter directory, a Hub id ``ORG/NAME[@REVISION]``, or a loaded
transformers model with its tokenizer. Rows are a path, a Hub split ``ORG/NAME[@REVISION]:SPLIT``,
a list of dicts or a ``datasets.Dataset``, holding SemEval rows or raw documents
(see ``unlearnlm.data.raw``). Everything is checked before a model loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unlearnlm.config import UnlearnConfig, load_config
from unlearnlm.data.raw import DEFAULT_TEXT_KEY, RowsInput, read_rows, refuse_shared_rows
from unlearnlm.errors import UserError
from unlearnlm.hub import LoadedModel, ModelSource, resolve_model

__all__ = ["evaluate", "evaluate_models", "load_config", "unlearn"]

ModelInput = str | Path | Any  # Any: a loaded transformers model (then ``tokenizer`` is that model's tokenizer)


def _model_input(model: ModelInput, tokenizer: Any) -> ModelSource | LoadedModel:
    if isinstance(model, (str, Path, ModelSource)):
        return resolve_model(model, tokenizer)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        raise UserError("a loaded model needs its loaded tokenizer (tokenizer=...)")
    return LoadedModel(model, tokenizer)


def unlearn(
    model: ModelInput,
    forget: RowsInput,
    retain: RowsInput,
    out: str | Path,
    config: str | UnlearnConfig | None = None,
    *,
    unseen: RowsInput | None = None,
    forgotten_before: Sequence[RowsInput] = (),
    overrides: Sequence[str] = (),
    tokenizer: Any = None,
    text_key: str = DEFAULT_TEXT_KEY,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    redact: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> dict:
    """Unlearn ``forget`` from ``model`` and save the result, its model card and ``run.json`` in ``out``.

    ``config`` is a preset name, a YAML file or an ``UnlearnConfig``; ``overrides`` are ``key=value``
    settings applied on top of a name or file. ``config="auto"`` calibrates the run on the model itself
    and needs ``unseen``: documents of the forget set's kind the model was not fine-tuned on (raw
    ``{text}``, MIA ``{document}`` or SemEval rows); ``run.json`` then carries a ``verdict``. With auto,
    ``forgotten_before`` names forget sets unlearned before from this model (a ledger's earlier
    requests): its settling pass and its check cover them with ``forget``. A loaded
    model is trained in place. ``redact`` keeps data file names and model paths out of the card;
    ``push_to_hub`` names a repository ``ORG/NAME`` to publish the saved directory to (``private`` when
    created). Returns the contents of ``run.json`` (with ``pushed``, the commit URL, when published).
    """
    from unlearnlm.distributed import join_launched_processes
    from unlearnlm.modelcard import check_push_target, publish
    from unlearnlm.recipe import unlearn as run_unlearning

    if push_to_hub is not None:
        check_push_target(push_to_hub)

    if isinstance(config, UnlearnConfig):
        if overrides:
            raise UserError("overrides apply to a preset or YAML file, not to an UnlearnConfig (edit it instead)")
        resolved = config
    else:
        resolved = load_config(config, list(overrides))
    if resolved.auto.enabled != (unseen is not None):
        raise UserError("--config auto needs --unseen U (unseen documents of the forget set's kind)" if unseen is None
                        else "--unseen is read by --config auto only (auto.enabled=true)")
    if forgotten_before and unseen is None:
        raise UserError("forgotten_before is settled and checked by --config auto only")
    options = dict(resume=resume, overwrite=overwrite, show_progress=show_progress, text_key=text_key, redact=redact)
    if unseen is not None:
        from unlearnlm.auto.run import unlearn_auto

        report = unlearn_auto(_model_input(model, tokenizer), forget, retain, unseen, out, resolved,
                              forgotten_before=forgotten_before, **options)
    else:
        report = run_unlearning(_model_input(model, tokenizer), forget, retain, out, resolved, **options)
    if push_to_hub is not None and join_launched_processes():
        report["pushed"] = publish(Path(out), push_to_hub, private)
    return report


def evaluate_models(
    models: Sequence[ModelInput],
    forget: RowsInput,
    retain: RowsInput,
    out: str | Path | None = None,
    *,
    tokenizer: Any = None,
    members: RowsInput | None = None,
    nonmembers: RowsInput | None = None,
    general: RowsInput | None = None,
    mmlu: str | Path | None = None,
    mmlu_shots: int = 5,
    official: bool = False,
    batch_size: int = 16,
    dtype: str | None = None,
    max_new_tokens: int = 256,
    redact: bool = False,
    text_key: str = DEFAULT_TEXT_KEY,
    overwrite: bool = False,
    reporter: Callable | None = None,
) -> list[tuple[str, dict]]:
    """``[(name, results)]`` for each model; with ``out``, the report is written there too.

    Launched on several processes, each scores its share of the rows and all of them return the
    gathered results; the main process writes the report.
    """
    from unlearnlm.evaluation.inputs import load_general_set, load_mia_documents
    from unlearnlm.paths import claim_output, release_output

    # Every input is checked before torch is imported and the first model loads.
    sources = [_model_input(model, tokenizer) for model in models]
    if not sources:
        raise UserError("no model to evaluate")
    if out is not None:
        claim_output(out, overwrite, inputs=[*(source.path for source in sources if isinstance(source, ModelSource)),
                                                 *(value for value in (forget, retain, members, nonmembers, general, mmlu)
                                                   if isinstance(value, (str, Path)))])
    if (members is None) != (nonmembers is None):
        raise UserError("MIA members and nonmembers go together")
    forget_set = read_rows(forget, "forget", text_key)
    retain_set = read_rows(retain, "retain", text_key)
    refuse_shared_rows(forget_set, retain_set)
    forget_rows, retain_rows = forget_set.for_evaluation(), retain_set.for_evaluation()
    member_documents = load_mia_documents(members, "members", text_key) if members is not None else None
    nonmember_documents = load_mia_documents(nonmembers, "nonmembers", text_key) if nonmembers is not None else None
    general_rows = load_general_set(general) if general is not None else None

    from unlearnlm.distributed import join_launched_processes
    from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, evaluate_paths
    from unlearnlm.evaluation.mmlu import load_mmlu
    from unlearnlm.evaluation.report import write_report

    data = EvalData(forget_rows, retain_rows, member_documents, nonmember_documents, general_rows,
                    load_mmlu(mmlu) if mmlu else None)
    settings = EvalSettings(batch_size=batch_size, official=official, max_new_tokens=max_new_tokens,
                            mmlu_shots=mmlu_shots, redact=redact)
    main = join_launched_processes()
    try:
        named_results = evaluate_paths(sources, data, settings, dtype or ("bfloat16" if official else "float32"),
                                       reporter)
        if out is not None and main:
            write_report(named_results, out, overwrite)
    finally:
        if out is not None:
            release_output(out)
    return named_results


def evaluate(model: ModelInput, forget: RowsInput, retain: RowsInput, out: str | Path | None = None, **options) -> dict:
    """The results of one model (see ``evaluate_models`` for the options): the official SemEval
    scores (``final``, ``aggregated-terms``, ``mia_loss_acc``, ...) with their details."""
    return evaluate_models([model], forget, retain, out, **options)[0][1]
