"""``--config auto``: unlearning that calibrates itself on the user's own model from the forget set F,
the retain set R and unseen text U alone (docs/methods.md, "Auto").

- ``unseen``: reading U, refusing a U that shares text with F or R, and splitting it into the part
  that sets the level and the held-out part that only checks;
- ``check``: the held-out check after every chunk, the stopping rule and the verdict;
- ``rate``: the learning-rate probe on the first chunk;
- ``run``: the whole procedure on top of the engine.
"""
