import pytest

from unlearnlm.config import load_config, preset_names
from unlearnlm.errors import UserError


def test_method_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: npo\noptim:\n  lr: 2.0e-5\nschedule:\n  epochs_per_chunk: 3\n")
    config = load_config(str(path), ["optim.lr=5e-5", "method_args.beta=0.2"])
    assert config.method == "npo"
    assert config.optim.lr == 5e-5
    assert config.schedule.epochs_per_chunk == 3
    assert config.schedule.chunk_size is None  # npo's own default: no chunking
    assert config.method_args == {"beta": 0.2}


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"), ("bogus=1", "bogus"), ("method_args.gamma=1", "method_args.gamma"),
    ("schedule.ratio=abc", "schedule.ratio"), ("optim.optimizer_reset=sometimes", "optim.optimizer_reset"),
])
def test_bad_keys_and_values_are_named(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_every_preset_loads():
    names = preset_names()
    assert {"olmo-7b-sugd", "olmo-1b-sugd", "olmo-7b-sugd-lora", "demo", "ga", "gd", "kl", "npo", "simnpo", "agad"} <= set(names)
    for name in names:
        load_config(f"configs/{name}.yaml")


def test_olmo_7b_preset_is_the_authors_setting():
    config = load_config("configs/olmo-7b-sugd.yaml")
    assert (config.schedule.chunk_size, config.schedule.ratio, config.schedule.epochs_per_chunk) == (32, 7, 7)
    assert (config.optim.lr, config.optim.batch_size, config.layers.last_k, config.dtype) == (1e-5, 1, 8, "bfloat16")
    assert config.method_args["retain_weight"] == 0.5


def test_a_selection_metric_needs_the_sets_it_is_computed_from():
    sets = ["validation.forget=f.jsonl", "validation.retain=r.jsonl"]
    with pytest.raises(UserError, match="validation.members and validation.nonmembers and validation.general"):
        load_config(None, sets)  # the default metric is the final score
    with pytest.raises(UserError, match="'utility' needs validation.general"):
        load_config(None, sets + ["validation.metric=utility"])
    assert load_config(None, sets + ["validation.metric=task_aggregate"]).validation.enabled
    # Logging a trajectory without selecting needs no more than the sets given.
    assert not load_config(None, sets + ["validation.select=false"]).validation.select
