"""unlearnlm: remove chosen data from a trained language model and measure that it is gone."""

__version__ = "0.1.0"
