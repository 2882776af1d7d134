"""The methods the bench compares: one table, each row naming the preset it runs (docs/extending.md).

A variant's preset is a shipped one (``configs/``, by name) or one of the bench's own
(``bench/variants/*.yaml``, by path); its ``optim.lr`` is the centre of the variant's learning-rate
grid. The bench hands each run its preset's settings as ``key=value`` overrides (``Variant.at_rate``),
so that ``results.json`` and the run records show every setting that ran.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from unlearnlm.config import read_yaml, resolve_config_path

BENCH_PRESETS = Path(__file__).resolve().parent / "variants"


def preset_overrides(preset: str | Path) -> tuple[tuple[str, ...], float]:
    """``(settings as key=value overrides, its learning rate)``: the preset without its ``optim.lr``."""
    settings = read_yaml(resolve_config_path(str(preset)))
    lr = float(settings.get("optim", {}).pop("lr"))
    return tuple(_flatten(settings)), lr


def _flatten(settings: dict, prefix: str = "") -> list[str]:
    overrides = []
    for key, value in settings.items():
        if isinstance(value, dict):
            overrides += _flatten(value, f"{prefix}{key}.")
        else:
            overrides.append(f"{prefix}{key}={_yaml_value(value)}")
    return overrides


def _yaml_value(value: object) -> str:
    """The value as an override reads it back (``config.parse_override`` parses YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(_yaml_value, value)) + "]"
    return str(value)


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str | Path
    description: str
    lr: float | None = None  # the grid's centre; None: the preset's own
    half_layers: bool = False  # train the last half of the decoder layers (the count is the target's)
    # The method setting that receives the target's loss on text outside every set (``forget_level``):
    # forget_ceiling (pushed up to it) or forget_target (held at it from both sides); None: no level.
    level_setting: str | None = None
    default: bool = True  # run when no --method is given; the others only by name
    # A second run on the first's model, holding every forget document at the level of unseen text
    # re-read on that model (forget_target): the preset of settle_run's pass, else None.
    settle_preset: str | None = None
    # --config auto: the variant reads its level and rate from the target and its unseen documents
    # (benchmark/unseen.jsonl), so it has no grid and no tuning runs.
    calibrates: bool = False
    n_layers: int = 1

    @property
    def overrides(self) -> tuple[str, ...]:
        half = (f"layers.last_k={max(1, self.n_layers // 2)}",) if self.half_layers else ()
        return preset_overrides(self.preset)[0] + half

    @property
    def centre(self) -> float:
        return self.lr if self.lr is not None else preset_overrides(self.preset)[1]

    @property
    def settle(self) -> tuple[str, ...] | None:
        """The settle pass's settings (its learning rate is the first run's)."""
        return preset_overrides(self.settle_preset)[0] if self.settle_preset else None

    def at_rate(self, multiplier: float) -> list[str]:
        """The variant's settings with ``multiplier`` times its centre learning rate (a calibrating
        variant: its settings, the rate being its own)."""
        return list(self.overrides) if self.calibrates else [*self.overrides, f"optim.lr={self.centre * multiplier}"]


SUGD, SUGD_LORA = BENCH_PRESETS / "sugd.yaml", BENCH_PRESETS / "sugd-lora.yaml"

# Listed heaviest first (tuning, reported run and audit, as timed in the bench of docs/benchmark.md), the
# order in which --jobs starts them, so that no long method starts last while the other processes sit
# idle. The centres come from one coarse sweep per variant on the tuning draw of the mini preset (3e-4,
# 1e-3 and 3e-3 for every method; 1e-3 to 5e-2 for LoRA, whose updates are smaller); see docs/benchmark.md.
VARIANTS: tuple[Variant, ...] = (
    Variant("auto", "auto", "sugd-level calibrated on the target itself: no grid, rate probed, held-out check",
            calibrates=True),
    Variant("agad", BENCH_PRESETS / "agad.yaml", "alternating ascent / annealing descent"),
    # sugd-level: SUGD on whole documents (data.records.whole_document, inside the run).
    Variant("sugd-level", "sugd-level", "SUGD on every weight, whole documents, pushed up to the unseen-text level",
            level_setting="forget_ceiling"),
    # One pass over every forget document at once, each held at the level from both sides, with retain
    # rows 1:3 as in SUGD's chunks: it revisits the chunks unlearned first, which the ascent on later
    # chunks pushed past the level (configs/sugd-settle.yaml).
    Variant("sugd-settle", "sugd-level",
            "sugd-level, then one pass holding every forget document at the unseen-text level of the unlearned model",
            level_setting="forget_ceiling", settle_preset="sugd-settle", default=False),
    # Held at the level from both sides: tried for docs/benchmark.md and left out of the default run,
    # which it lost (under-forgetting); run it with --method sugd-target.
    Variant("sugd-target", "sugd-level", "SUGD on every weight, whole documents, held at the unseen-text level",
            level_setting="forget_target", default=False),
    Variant("sugd", SUGD, "SUGD on every weight"),
    Variant("npo", BENCH_PRESETS / "npo.yaml", "NPO (beta 0.1) + retain NLL"),
    Variant("sugd-doc", "sugd-level", "SUGD on every weight, forgetting whole documents"),
    Variant("sugd-layers", SUGD, "SUGD on the last half of the layers", lr=3e-3, half_layers=True),
    Variant("kl", BENCH_PRESETS / "kl.yaml", "ascent + KL to the original on retain"),
    Variant("gd", BENCH_PRESETS / "gd.yaml", "gradient difference, no chunking"),
    Variant("sugd-lora", SUGD_LORA, "SUGD with LoRA adapters"),
    Variant("simnpo", BENCH_PRESETS / "simnpo.yaml", "SimNPO + retain NLL"),
    Variant("sugd-lora-layers", SUGD_LORA, "SUGD with LoRA on the last half of the layers", lr=2e-2, half_layers=True),
    Variant("rmu", BENCH_PRESETS / "rmu.yaml", "RMU: forget activations steered to a random direction"),
    Variant("ga", BENCH_PRESETS / "ga.yaml", "gradient ascent"),
)


def variants(n_layers: int) -> dict[str, Variant]:
    """The compared methods, for a target of ``n_layers`` decoder layers."""
    return {variant.name: replace(variant, n_layers=n_layers) for variant in VARIANTS}
