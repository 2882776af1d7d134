"""Pinned CPU kernels: the same weights, bit for bit, on x86 machines that differ in instruction set.

torch picks its own vectorized kernels (elementwise ops, reductions, softmax, the optimizer's updates)
for the widest instruction set the CPU has, and MKL, which does its matrix products, picks its code
path by CPU as well; kernels of different widths add in different orders, so the last bits of a
training step differ, and thousands of steps carry them into different models (docs/benchmark.md).
Pinning both to AVX2, which every machine of the project's kind has, makes the choice the same
everywhere: ``ATEN_CPU_CAPABILITY`` for torch and MKL's conditional numerical reproducibility
(``MKL_CBWR``, strict). Measured by ``scripts/pinned_kernels.py``: unpinned, a micro fine-tuning
gives other weights with torch's kernels at AVX2 than at AVX-512; pinned, the same weights whatever
the environment asks for, at about the native speed (torch's AVX2 kernels are as fast as its AVX-512
ones at this model size).

Both are read when the libraries first choose a kernel, so the command line (``cli.main``) pins them
before any command imports torch, and the processes a command starts inherit them. The Python API
runs with whatever kernels its process has; ``UNLEARNLM_KERNELS=native`` leaves the environment as
it is.
"""

from __future__ import annotations

import os
import sys

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
SWITCH = "UNLEARNLM_KERNELS"  # "native": no pins


def pin_kernels() -> bool:
    """Set ``PINS`` in this process's environment, and so its children's; whether it did. It does not
    when ``UNLEARNLM_KERNELS`` is ``native``, nor once torch is loaded (the command line called in a
    process that already runs torch): that process keeps its kernels, and its children the same ones."""
    if os.environ.get(SWITCH, "pinned") == "native" or "torch" in sys.modules:
        return False
    os.environ.update(PINS)
    return True


def kernels() -> str:
    """The instruction set of torch's CPU kernels in this process (``AVX2``, ``AVX512``, ``DEFAULT``)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
