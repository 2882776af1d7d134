"""unlearnlm: remove chosen data from a trained language model and measure that it is gone."""

import logging

__version__ = "0.1.0"
__all__ = ["evaluate", "load_config", "unlearn"]


def __getattr__(name: str):
    # The API loads on first use, so that `unlearnlm --help` and bad input stay fast.
    if name in __all__:
        from unlearnlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'unlearnlm' has no attribute {name!r}")

# torchao (the audit's quantization library) is imported by transformers and peft whenever it is
# installed, and on a CPU-only torch it warns at import about its GPU kernels and torch's pytree
# registry; neither concerns anything unlearnlm runs, so those two loggers report errors only.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
