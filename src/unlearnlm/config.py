"""Typed, validated configuration for unlearning runs: YAML presets plus ``key=value`` overrides.

Resolution order: the dataclass defaults, then the chosen method's defaults, then the YAML file,
then command-line overrides. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from unlearnlm.errors import UserError
from unlearnlm.evaluation.metrics import METRICS, SELECTABLE
from unlearnlm.methods import get_method
from unlearnlm.settings import bounded, build_dataclass


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = bounded(16, at_least=1)
    alpha: int = bounded(32, above=0)
    dropout: float = bounded(0.0, at_least=0, below=1)
    # None: the default of the model's family (model.LORA_TARGETS, docs/extending.md).
    target_modules: Optional[list[str]] = None


@dataclass
class LayerSettings:
    """Which decoder layers train. ``last_k`` and ``indices`` are exclusive; neither means all.

    ``train_outside`` names the weights outside the decoder layers that train with the selected
    layers (the rest of the model stays frozen); the authors' two notebooks differ here, see
    docs/methods.md.
    """

    last_k: Optional[int] = bounded(None, at_least=1)
    indices: Optional[list[int]] = bounded(None, at_least=0)
    train_outside: list[Literal["embeddings", "final_norm", "lm_head"]] = field(default_factory=list)


@dataclass
class ScheduleSettings:
    """The data schedule (see data/schedule.py); ``chunk_size: null`` means one chunk of everything."""

    chunk_size: Optional[int] = bounded(32, at_least=1)
    ratio: int = bounded(7, at_least=0)  # 0: forget rows only
    epochs_per_chunk: int = bounded(7, at_least=1)
    shuffle_within_chunk: bool = False


@dataclass
class OptimSettings:
    lr: float = bounded(1e-5, above=0)
    batch_size: int = bounded(1, at_least=1)
    grad_accum: int = bounded(1, at_least=1)
    weight_decay: float = bounded(0.0, at_least=0)
    warmup_steps: int = bounded(0, at_least=0)
    max_grad_norm: Optional[float] = bounded(1.0, above=0)
    # The authors rebuilt AdamW for every chunk; 'never' keeps one optimizer state across chunks.
    optimizer_reset: Literal["per_chunk", "never"] = "per_chunk"
    max_steps: Optional[int] = bounded(None, at_least=1)
    time_budget_s: Optional[float] = bounded(None, above=0)


VALIDATION_SETS = ("forget", "retain", "members", "nonmembers", "general")  # the --val-* options


@dataclass
class ValidationSettings:
    """Checkpoint selection: score held-out sets during unlearning and keep the best state."""

    forget: Optional[str] = None
    retain: Optional[str] = None
    members: Optional[str] = None
    nonmembers: Optional[str] = None
    general: Optional[str] = None
    every_steps: Optional[int] = bounded(None, at_least=1)  # None: after every chunk
    metric: str = "final"  # a selectable metric of evaluation/metrics.py
    # False: log the trajectory only and keep the last state (e.g. when validating on reported data).
    select: bool = True
    max_new_tokens: int = bounded(64, at_least=1)
    batch_size: int = bounded(16, at_least=1)

    @property
    def enabled(self) -> bool:
        return self.forget is not None and self.retain is not None


@dataclass
class TrackingSettings:
    """Where the losses and validation scores are logged besides unlearn_log.jsonl (see tracking.py)."""

    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    project: str = "unlearnlm"  # the W&B project, the TensorBoard run folder


@dataclass
class GuardSettings:
    """Gradient ascent diverges: stop on a non-finite loss or a forget loss above this bound."""

    max_forget_loss: Optional[float] = bounded(30.0, above=0)


@dataclass
class AutoSettings:
    """``--config auto`` (auto/, docs/methods.md "Auto"): the level and the rate read from the model,
    a held-out check after every chunk, and these bounds of the check."""

    enabled: bool = False
    # The retain answers' loss may rise by this fraction of its distance to the level of unseen text.
    retain_tolerance: float = bounded(0.1, above=0, below=1)
    # F's answers may be regurgitated as much as held-out unseen text's continuations, plus this.
    regurgitation_margin: float = bounded(0.1, at_least=0, below=1)
    # R's answers must keep this fraction of their score before unlearning (each term's ratio is capped at 1,
    # so more than 1 could never be met).
    retain_kept: float = bounded(0.9, above=0, at_most=1)
    # The learning rate to train at, instead of probing for one (a ledger passes on the rate its first
    # request probed, docs/ledger.md); None: probe.
    rate: Optional[float] = bounded(None, above=0)
    # At most this many settling passes over all of F after the chunks, each followed by the check: the
    # run stops after the first one whose check is met (docs/methods.md, "Auto").
    settle_passes: int = bounded(3, at_least=1)


@dataclass
class UnlearnConfig:
    method: str = "sugd"
    method_args: dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    layers: LayerSettings = field(default_factory=LayerSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    auto: AutoSettings = field(default_factory=AutoSettings)
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    max_length: Optional[int] = bounded(None, at_least=2)  # a prompt token and an answer token
    # The authors' unlearning rows end at the answer; true adds a labelled EOS after it.
    append_eos: bool = False
    # Forget each sentence completion's whole text rather than its answer (data.records.whole_document).
    forget_whole_documents: bool = False
    seed: int = bounded(0, at_least=0, below=2**32)  # numpy's seeds are unsigned 32-bit integers
    save: Literal["merged", "adapter"] = "merged"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "method_args":
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and key == "method_args":
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``optim.lr=5e-5`` -> {'optim': {'lr': 5e-05}}; the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise UserError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw != "" else None
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


PRESET_DIR = resources.files("unlearnlm") / "configs"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(config: str) -> Path:
    """A file path, or a preset: its name or ``configs/<name>.yaml`` (the package's own file).

    Any other path must exist: a mistyped ``/my/dir/gd.yaml`` is an error, never the preset ``gd``.
    """
    path = Path(config)
    if path.is_file():
        return path
    preset_spelling = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    packaged = PRESET_DIR / f"{name}.yaml"
    if preset_spelling and packaged.is_file():
        return Path(str(packaged))
    if not preset_spelling or path.suffix in (".yaml", ".yml"):
        raise UserError(f"config {config!r}: no such file")
    raise UserError(f"config {config!r}: no such file or preset (presets: {', '.join(preset_names())})")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({err.__class__.__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a YAML text file (it is not valid UTF-8)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of settings")
    return data


def load_config(config: str | None = None, overrides: list[str] | None = None) -> UnlearnConfig:
    """Resolve defaults < method defaults < YAML < overrides into a validated UnlearnConfig."""
    user: dict = read_yaml(resolve_config_path(config)) if config else {}
    for override in overrides or []:
        user = deep_merge(user, parse_override(override))
    method = get_method(str(user.get("method", UnlearnConfig.method)))
    merged = deep_merge(method.config_defaults, user)
    merged["method"] = method.name
    resolved = build_dataclass(UnlearnConfig, merged)
    # Validate method_args against the method's own settings now, so a typo fails before training.
    method.build_settings(resolved.method_args)
    if resolved.layers.last_k is not None and resolved.layers.indices is not None:
        raise UserError("settings 'layers.last_k' and 'layers.indices' are exclusive")
    if resolved.layers.indices is not None and len(set(resolved.layers.indices)) != len(resolved.layers.indices):
        raise UserError(f"setting 'layers.indices': {resolved.layers.indices} names a layer twice")
    if resolved.layers.indices == []:
        raise UserError("setting 'layers.indices': an empty list trains nothing (use null for every layer)")
    if resolved.lora.enabled and resolved.lora.target_modules == []:
        raise UserError("setting 'lora.target_modules': LoRA needs at least one module name (null: the model family's default)")
    if resolved.layers.train_outside and (resolved.lora.enabled or
                                          (resolved.layers.last_k is None and resolved.layers.indices is None)):
        raise UserError("setting 'layers.train_outside' needs layers.last_k or layers.indices and no LoRA "
                        "(without a layer selection every weight trains)")
    if resolved.save == "adapter" and not resolved.lora.enabled:
        raise UserError("setting 'save'='adapter' needs LoRA (lora.enabled=true); without it save the merged model")
    refuse_validation_with_auto(resolved)
    _check_validation_metric(resolved.validation)
    return resolved


def refuse_validation_with_auto(config: UnlearnConfig) -> None:
    """Auto checks itself on held-out unseen text; any --val-* set beside it is an error (also for a
    configuration built in Python, which does not pass through ``load_config``)."""
    if config.auto.enabled and any(getattr(config.validation, name) is not None for name in VALIDATION_SETS):
        raise UserError("--config auto checks itself on held-out unseen text: leave out the --val-* sets")


def _check_validation_metric(plan: ValidationSettings) -> None:
    if plan.metric not in SELECTABLE:
        raise UserError(f"setting 'validation.metric': {plan.metric!r} is not one of {', '.join(SELECTABLE)}")
    if not (plan.enabled and plan.select):
        return
    missing = [name for name in METRICS[plan.metric].needs if getattr(plan, name) is None]
    if missing:
        raise UserError(f"setting 'validation.metric'={plan.metric!r} needs validation.{' and validation.'.join(missing)} "
                        "(or validation.metric=task_aggregate)")
