"""The original model's values a method compares against (KL's token distributions, RMU's hidden
states), without a second model in memory.

Without LoRA they are computed once, before any weight moves, for the rows the method reads them on
(``reference_roles``), and kept on the CPU in float32, as computed: a rounded copy would make the
unchanged model differ from itself. With LoRA the original model is the same model with its adapters
switched off, so nothing is kept and each batch asks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

from unlearnlm.data.tokenize import Example
from unlearnlm.methods.base import Batch, forward
from unlearnlm.model import is_peft

FILL_BATCH = 8


class ReferenceValues:
    def __init__(self, method, layers: Sequence[int], device: torch.device):
        self.method, self.layers, self.device = method, tuple(layers), device
        self.logits: dict[str, torch.Tensor] = {}  # row key -> the method's view of the original logits
        self.hidden: dict[str, dict[int, torch.Tensor]] = {}  # row key -> layer -> [real tokens, H]

    @property
    def needed(self) -> bool:
        return self.method.reference_view is not None or self.method.reference_hidden

    def fill(self, model: torch.nn.Module, unwrapped: torch.nn.Module, examples: Sequence[Example],
             collate: Callable[[list[Example]], Batch]) -> None:
        """Compute the original values of ``examples`` (every row the method will read them on), once."""
        if not self.needed or is_peft(unwrapped) or self.logits or self.hidden:
            return
        hidden_layers = self.layers if self.method.reference_hidden else ()
        model.eval()
        for start in range(0, len(examples), FILL_BATCH):
            batch = collate(list(examples[start:start + FILL_BATCH]))
            with torch.no_grad():
                logits = forward(model, batch, hidden_layers, key="reference_hidden")
            if self.method.reference_view is not None:
                for key, value in zip(batch["keys"], self.method.reference_view(logits, batch["labels"])):
                    self.logits[key] = value.to("cpu", torch.float32)
            for row, key in enumerate(batch["keys"] if hidden_layers else []):
                length = int(batch["attention_mask"][row].sum())
                self.hidden[key] = {layer: states[row, :length].to("cpu", torch.float32)
                                    for layer, states in batch["reference_hidden"].items()}
        model.train()

    def read(self, unwrapped: torch.nn.Module, batch: Batch) -> Optional[list[torch.Tensor]]:
        """The values for ``batch``: ``reference_view``'s are returned, hidden states (``reference_hidden``)
        go to ``batch["reference_hidden"]``."""
        method = self.method
        if not self.needed:
            return None
        hidden_layers = self.layers if method.reference_hidden else ()
        if is_peft(unwrapped):
            with torch.no_grad(), unwrapped.disable_adapter():
                logits = forward(unwrapped, batch, hidden_layers, key="reference_hidden")
            return method.reference_view(logits, batch["labels"]) if method.reference_view else None
        if hidden_layers:
            batch["reference_hidden"] = self._padded_hidden(batch, unwrapped.config.hidden_size)
        return [self.logits.get(key) for key in batch["keys"]] if method.reference_view else None

    def _padded_hidden(self, batch: Batch, size: int) -> dict[int, torch.Tensor]:
        """The kept hidden states re-padded to the batch ([B, T, H] per layer); zeros on rows the method
        reads no reference for and on padding."""
        rows, width = batch["attention_mask"].shape
        padded = {}
        for layer in self.layers:
            states = torch.zeros(rows, width, size, device=self.device)
            for row, key in enumerate(batch["keys"]):
                kept = self.hidden.get(key)
                if kept is not None:
                    states[row, :kept[layer].shape[0]] = kept[layer].to(self.device)
            padded[layer] = states
        return padded
