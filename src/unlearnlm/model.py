"""Loading a causal LM safely, choosing what trains (LoRA, layer focus, both), and saving it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from unlearnlm.config import LayerSettings, LoraSettings
from unlearnlm.data.tokenize import ensure_pad_token
from unlearnlm.errors import UserError
from unlearnlm.hub import ModelSource, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The modules LoRA adapts when ``lora.target_modules`` is not set, by transformers' ``model_type``: the
# attention's query and value projections and the MLP's up and down projections, in each family's
# names (the Llama-family list is the SemEval authors' LoRA run). GPT-2 fuses q, k and v in ``c_attn``
# and names both the attention output and the MLP down projection ``c_proj``; GPT-NeoX and Falcon fuse
# them in ``query_key_value``.
_LLAMA_STYLE = ("q_proj", "v_proj", "up_proj", "down_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "olmo", "olmo2", "olmo3", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text"),
                    _LLAMA_STYLE),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "gptj": ("q_proj", "v_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "v_proj", "fc1", "fc2"),
}


def lora_target_modules(model: nn.Module, configured: list[str] | None) -> list[str]:
    """``lora.target_modules`` when set, else the default of the model's family."""
    if configured is not None:
        return list(configured)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LORA_TARGETS:
        raise UserError(f"setting 'lora.target_modules': no default for model type {model_type!r} "
                        f"(defaults exist for {', '.join(sorted(LORA_TARGETS))}); name the modules to adapt")
    return list(LORA_TARGETS[model_type])


def stores_weights_transposed(model: nn.Module, targets: list[str]) -> bool:
    """Whether the adapted modules are GPT-2-style ``Conv1D`` layers, whose weight is (in, out):
    LoRA must know, or peft corrects it with a warning."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for name, module in model.named_modules() if name.split(".")[-1] in targets)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_tokenizer(source: str | Path | ModelSource, dtype: str = "float32", quantization=None):
    """A model directory, a Hub id or a LoRA adapter (merged into its base in memory), from
    safetensors, without remote code. ``quantization`` (a transformers quantization config, e.g.
    bitsandbytes') quantizes the weights as they load, onto ``default_device()``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(source)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use {' or '.join(DTYPES)})")
    weights = source.base.path if source.is_adapter else source.path
    # A quantized model is placed as it loads: it cannot be moved to a device afterwards.
    placed = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(default_device())}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir, trust_remote_code=False)
        with transformers_quiet():  # what it would warn about (missing weights) is an error below
            model, info = AutoModelForCausalLM.from_pretrained(
                weights, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False, output_loading_info=True,
                **placed)
        check_loaded(source, model, tokenizer, info)
        if source.is_adapter:
            from peft import PeftModel

            with peft_deprecations_silenced():
                model = PeftModel.from_pretrained(model, source.path, use_safetensors=True).merge_and_unload()
    except (OSError, ValueError) as err:
        raise UserError(f"{source.spec}: cannot load model ({str(err).splitlines()[0]})") from None
    ensure_pad_token(tokenizer)
    return model, tokenizer


def model_context(model: nn.Module) -> int | None:
    """The most positions the model takes at once (None when its config does not say)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@contextmanager
def transformers_quiet() -> Iterator[None]:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def check_loaded(source: ModelSource, model: nn.Module, tokenizer, info: dict) -> None:
    """Refuse weights that do not fill the architecture (transformers would start the missing ones at
    random) and an embedding with fewer rows than the tokenizer has tokens."""
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(f"{source.spec}: the checkpoint lacks {len(missing)} weight(s) the architecture needs, "
                        f"e.g. {sorted(missing)[0]} (a damaged or partial checkpoint)")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise UserError(f"{source.spec}: weight {mismatched[0][0]} has another shape than config.json gives it")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{source.spec}: the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} "
                        "rows (a tokenizer of another model? --tokenizer names the model's own)")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks and its attribute name ('layers' for Llama/OLMo/Qwen, 'h' for GPT-2)."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
    if not candidates:
        raise UserError("cannot find the decoder layers of this model (no 'layers' or 'h' module list)")
    name, layers = max(candidates, key=lambda item: len(item[1]))
    return name, layers


def select_layers(n_layers: int, settings: LayerSettings) -> list[int] | None:
    """Indices of the layers that train, or None for all of them."""
    if settings.last_k is not None:
        if not 1 <= settings.last_k <= n_layers:
            raise UserError(f"setting 'layers.last_k'={settings.last_k} but the model has {n_layers} layers")
        return list(range(n_layers - settings.last_k, n_layers))
    if settings.indices is not None:
        bad = [index for index in settings.indices if not 0 <= index < n_layers]
        if bad:
            raise UserError(f"setting 'layers.indices': {bad} out of range for {n_layers} layers")
        return sorted(set(settings.indices))
    return None


def model_depth(source: str | Path | ModelSource) -> int | None:
    """The number of decoder layers in ``config.json`` (an adapter's base's), read without loading any weights."""
    from transformers import AutoConfig

    config_dir = resolve_model(source).config_dir
    return getattr(AutoConfig.from_pretrained(config_dir, trust_remote_code=False), "num_hidden_layers", None)


def check_layer_choice(source: str | Path | ModelSource, settings: LayerSettings) -> None:
    """Check ``layers.*`` against the depth in ``config.json``, before any weights load."""
    if settings.last_k is None and settings.indices is None:
        return
    depth = model_depth(source)
    if depth is not None:
        select_layers(depth, settings)


NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f")


def outside_modules(model: nn.Module, layer_path: str) -> dict[str, nn.Module]:
    """The token embeddings, the final norm and the LM head, by their ``layers.train_outside`` names."""
    parent = model.get_submodule(layer_path.rsplit(".", 1)[0]) if "." in layer_path else model
    norms = [getattr(parent, name) for name in NORM_NAMES if isinstance(getattr(parent, name, None), nn.Module)]
    found = {"embeddings": model.get_input_embeddings(), "final_norm": norms[0] if norms else None,
             "lm_head": model.get_output_embeddings()}
    return {name: module for name, module in found.items() if module is not None}


def unfreeze_outside(model: nn.Module, layer_path: str, names: list[str]) -> None:
    modules = outside_modules(model, layer_path)
    missing = [name for name in names if name not in modules]
    if missing:
        raise UserError(f"setting 'layers.train_outside': this model has no {missing[0]} module")
    if "embeddings" in modules and "lm_head" in modules and modules["embeddings"].weight is modules["lm_head"].weight \
            and ("embeddings" in names) != ("lm_head" in names):
        raise UserError("setting 'layers.train_outside': this model ties its embeddings to its LM head; "
                        "list both or neither")
    for name in names:
        modules[name].requires_grad_(True)


@contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """peft reads transformers' renamed ``is_gradient_checkpointing``: a warning in every LoRA run that
    the user can do nothing about (peft's to fix), so it is kept out of their output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_trainable(model: nn.Module, lora: LoraSettings, layers: LayerSettings) -> nn.Module:
    """Freeze what must not change. LoRA adapters go only on the selected layers when both are set;
    with a layer selection, ``layers.train_outside`` adds embeddings, final norm or LM head."""
    layer_path, stack = decoder_layers(model)
    selected = select_layers(len(stack), layers)
    if layers.train_outside and (lora.enabled or selected is None):
        raise UserError("setting 'layers.train_outside' needs layers.last_k or layers.indices and no LoRA "
                        "(without a layer selection every weight trains)")
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules(model, lora.target_modules)
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            fan_in_fan_out=stores_weights_transposed(model, targets),
            layers_to_transform=selected, layers_pattern=layer_path.split(".")[-1] if selected else None,
            task_type="CAUSAL_LM",
        )
        try:
            with peft_deprecations_silenced():
                return get_peft_model(model, peft_config)
        except ValueError as err:
            raise UserError(f"LoRA: {str(err).splitlines()[0]}") from None
    if selected is None:
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    for index in selected:
        stack[index].requires_grad_(True)
    unfreeze_outside(model, layer_path, layers.train_outside)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def save_model(model: nn.Module, tokenizer, out_dir: Path, mode: str = "merged") -> None:
    """Merged weights (a plain model directory) or the LoRA adapter only, as safetensors (without
    transformers' progress bar, which would come between a failure and its one error line)."""
    if mode == "adapter" and not is_peft(model):
        raise UserError("save=adapter needs LoRA (lora.enabled=true)")
    with transformers_quiet():
        if mode == "adapter":
            model.save_pretrained(out_dir, safe_serialization=True)
        else:
            plain = model.merge_and_unload() if is_peft(model) else model
            plain.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
