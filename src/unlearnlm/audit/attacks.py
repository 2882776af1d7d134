"""The audit's attacks: each changes the model or the prompts, never the scoring.

- Relearning (Hu et al., arXiv 2406.13356; Deeb and Roger, arXiv 2410.08827): fine-tune on one half
  T of the forget documents, score the other half V, which the fine-tuning never saw.
- Quantization (Zhang et al., arXiv 2410.16454): 8-bit and 4-bit weight quantization of the
  decoder's linear layers, as a deployment would compress it: bitsandbytes (LLM.int8, NF4) where
  deployments use it, on a CUDA GPU; torchao's round-to-nearest weight-only scheme elsewhere.
- Extraction beyond greedy decoding (Patil et al., arXiv 2309.17410; Lynch et al., arXiv
  2402.16835): sampled decoding, prompts cut shorter, the document's own earlier text in context.

Every function here returns a model or a list of rows; the official scoring happens in
``unlearnlm.audit.run``.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from unlearnlm.config import LayerSettings, LoraSettings
from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import collate, encode_example
from unlearnlm.errors import UserError
from unlearnlm.evaluation.generation import generate_batched
from unlearnlm.evaluation.likelihood import TokenCache, encode_texts
from unlearnlm.evaluation.scoring import row_score
from unlearnlm.methods.base import example_nll
from unlearnlm.model import apply_trainable, is_peft, lora_target_modules


@dataclass(frozen=True)
class RelearnBudget:
    """A fixed, small fine-tuning budget: AdamW on the answer tokens (as unlearning trains them).

    30 steps of 4 rows is "a few dozen steps", the scale at which Hu et al. and Deeb and Roger
    report most of the unlearned knowledge back. The rates are the largest that leave a memorized
    tiny target's V fully recalled (a sanity condition: relearning on T must not erase V); measured
    on the pretrained micro target: full fine-tuning at 5e-4 dropped V's forget score to 0.89 and
    LoRA at 5e-3 to 0.74, while 2e-4 and 1e-3 kept it at 1.0. LoRA, which moves far fewer weights,
    gets five times the full rate. A 7B model wants rates near its own unlearning rate (1e-5 in the
    SUGD presets).
    """

    steps: int = 30
    batch_size: int = 4
    lr_full: float = 2e-4
    lora_lr_factor: float = 5.0
    lora_r: int = 8
    lora_alpha: int = 16

    @property
    def lr_lora(self) -> float:
        return self.lr_full * self.lora_lr_factor

    def describe(self, mode: str, model: torch.nn.Module) -> dict:
        common = {"mode": mode, "steps": self.steps, "batch_size": self.batch_size, "optimizer": "AdamW",
                  "loss": "answer-token NLL"}
        if mode == "lora":
            return {**common, "lr": self.lr_lora, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
                    "lora_targets": lora_target_modules(model, None)}
        return {**common, "lr": self.lr_full}


def split_documents(rows: Sequence[Record], seed: int) -> tuple[list[Record], list[Record]]:
    """Disjoint halves (T, V) of the forget documents (``id[:-3]``), a document's rows kept together.

    The documents are put in a seeded order; T takes the first half (rounded down), V the rest, so V
    is never empty. Rows keep their file order within each half.
    """
    documents = sorted({row.document_id for row in rows})
    if len(documents) < 2:
        raise UserError(f"the relearning attack needs at least 2 forget documents to split (found {len(documents)})")
    random.Random(seed).shuffle(documents)
    train_ids = set(documents[: len(documents) // 2])
    return [row for row in rows if row.document_id in train_ids], [row for row in rows if row.document_id not in train_ids]


def relearn(model: torch.nn.Module, tokenizer, rows: Sequence[Record], mode: str, budget: RelearnBudget,
            seed: int) -> torch.nn.Module:
    """Fine-tune ``model`` (changed in place; LoRA adapters are merged back) on ``rows``.

    Batches are drawn cyclically from a seeded order of the rows, so every row is seen before any
    repeats, whatever the number of rows.
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"unknown relearning mode {mode!r}")
    torch.manual_seed(seed)  # LoRA initialisation draws random numbers
    lora = LoraSettings(enabled=mode == "lora", r=budget.lora_r, alpha=budget.lora_alpha)
    model = apply_trainable(model, lora, LayerSettings())
    device = next(model.parameters()).device
    # With EOS, as the target learned its rows: without it the fine-tuning also teaches the model not
    # to stop, and exact-match answers fail for that reason alone, which would hide what came back.
    examples = [encode_example(tokenizer, row.input, row.output, append_eos=True) for row in rows]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    params = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=budget.lr_lora if mode == "lora" else budget.lr_full)
    model.train()
    for step in range(budget.steps):
        picked = [examples[order[(step * budget.batch_size + offset) % len(order)]] for offset in range(budget.batch_size)]
        batch = {name: tensor.to(device) for name, tensor in collate(picked, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        example_nll(logits, batch["labels"]).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model.merge_and_unload() if is_peft(model) else model


# --- quantization -----------------------------------------------------------------------------------

# 4-bit groups of 128 input weights share a scale, the usual group size of 4-bit LLM checkpoints
# (AWQ, GPTQ); a layer whose width is not a multiple of it gets one scale per output row.
INT4_GROUP = 128


def _decoder_linear(module: torch.nn.Module, name: str) -> bool:
    # The output head stays in full precision, as transformers' bitsandbytes integration keeps it.
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


QUANTIZERS = ("auto", "torchao", "bitsandbytes")


def resolve_quantizer(requested: str, device: torch.device) -> str:
    """The quantization library to attack with. ``auto``: bitsandbytes for a model on a CUDA GPU,
    where deployments quantize with it, when it is installed; torchao otherwise (it runs anywhere)."""
    if requested not in QUANTIZERS:
        raise UserError(f"unknown quantizer {requested!r} (use {', '.join(QUANTIZERS)})")
    installed = bitsandbytes_installed()
    if requested == "auto":
        return "bitsandbytes" if device.type == "cuda" and installed else "torchao"
    if requested == "bitsandbytes" and not installed:
        raise UserError("the bitsandbytes quantizer needs the bitsandbytes package: pip install 'unlearnlm[bnb]'")
    return requested


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def bitsandbytes_config(bits: int, compute_dtype: torch.dtype):
    """8-bit: LLM.int8 (Dettmers et al., arXiv 2208.07339) with its default outlier threshold of 6.
    4-bit: NF4 (Dettmers et al., arXiv 2305.14314) computing in the model's dtype. transformers keeps
    the output head in full precision, as torchao's path here does."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"unsupported bit width {bits} (8 or 4)")


QUANTIZATION_SCHEMES = {
    ("torchao", 8): "round-to-nearest, weight-only int8, one scale per output channel (torchao)",
    ("torchao", 4): f"round-to-nearest, weight-only int4, one scale per {INT4_GROUP} inputs (per output channel in "
                    f"layers narrower than that) (torchao)",
    ("bitsandbytes", 8): "LLM.int8, outlier threshold 6 (bitsandbytes)",
    ("bitsandbytes", 4): "NF4 weights, compute in the model's dtype (bitsandbytes)",
}


def quantized_model(path, bits: int, dtype: str, quantizer: str):
    """``(model, tokenizer)``: the model at ``path`` with its decoder's linear layers quantized to ``bits``
    by ``quantizer`` (``resolve_quantizer``'s answer); bitsandbytes quantizes as the weights load."""
    from unlearnlm.model import DTYPES, default_device, load_model_and_tokenizer

    if quantizer == "bitsandbytes":
        return load_model_and_tokenizer(path, dtype, quantization=bitsandbytes_config(bits, DTYPES[dtype]))
    model, tokenizer = load_model_and_tokenizer(path, dtype)
    return quantize(model.to(default_device()), bits), tokenizer


def quantize(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Round-to-nearest, weight-only quantization of the decoder's linear layers (torchao), in place.

    8-bit: symmetric int8 with one scale per output channel. 4-bit: symmetric int4 with one scale
    per group of ``INT4_GROUP`` inputs. Activations stay in the model's dtype.
    """
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if bits == 8:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_decoder_linear)
    elif bits == 4:
        for grouped, granularity in ((True, PerGroup(INT4_GROUP)), (False, PerAxis(0))):
            def chosen(module: torch.nn.Module, name: str, grouped: bool = grouped) -> bool:
                return _decoder_linear(module, name) and (module.in_features % INT4_GROUP == 0) == grouped

            quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity), filter_fn=chosen)
    else:
        raise ValueError(f"unsupported bit width {bits} (8 or 4)")
    return model


# --- extraction beyond greedy decoding ------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingBudget:
    """n samples per prompt at this temperature and nucleus; a row scores its best sample."""

    samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.95

    def describe(self) -> dict:
        return {"samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "row_score": "best over the samples (ROUGE-L recall or exact match)"}


def sampled_best_rows(model, tokenizer, rows: Sequence[Record], budget: SamplingBudget, seed: int,
                      batch_size: int, max_new_tokens: int, cache: TokenCache) -> list[dict]:
    """One scored row per input row: the sample with the highest official row score."""
    prompts = encode_texts(tokenizer, [row.input for row in rows], cache)
    repeated = [prompt for prompt in prompts for _ in range(budget.samples)]
    torch.manual_seed(seed)
    texts = generate_batched(model, tokenizer, repeated, batch_size, max_new_tokens,
                             sampling={"do_sample": True, "temperature": budget.temperature, "top_p": budget.top_p})
    scored = []
    for index, row in enumerate(rows):
        samples = texts[index * budget.samples:(index + 1) * budget.samples]
        scores = [row_score(row.kind, row.output, text) for text in samples]
        best = max(range(len(samples)), key=scores.__getitem__)
        scored.append({"id": row.id, "task": row.task, "kind": row.kind, "split": "forget", "input": row.input,
                       "output": row.output, "generation": samples[best], "score": scores[best]})
    return scored


def shortened(rows: Sequence[Record], fraction: float) -> list[Record]:
    """Each prompt cut to its last ``fraction`` of words (at least one): the text nearest the answer."""
    if not 0 < fraction < 1:
        raise ValueError("a prompt fraction lies strictly between 0 and 1")
    cut = []
    for row in rows:
        words = row.input.split(" ")
        cut.append(replace(row, input=" ".join(words[-max(1, math.ceil(len(words) * fraction)):])))
    return cut


def with_document_context(rows: Sequence[Record]) -> list[Record]:
    """Questions preceded by the earlier text of their own document (its sentence-completion prompt).

    Only the prompt part of the document is given, never the sentence that the completion row scores.
    Sentence-completion rows are unchanged: their prompt already is the document's earlier text.
    """
    context = {row.document_id: row.input for row in rows if row.kind == "sc"}
    return [replace(row, input=f"{context[row.document_id]}\n{row.input}")
            if row.kind == "qa" and row.document_id in context else row for row in rows]
