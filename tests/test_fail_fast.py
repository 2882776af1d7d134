"""Everything checkable before a model loads is checked before it loads: with loading replaced by a
failure, each bad input still ends in its own one-line error."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli


@pytest.fixture
def no_loading(monkeypatch):
    import unlearnlm.model
    import unlearnlm.recipe  # imported now, so that it does not keep the failing loader once the test is over

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before every input was checked")

    for module in (unlearnlm.model, unlearnlm.recipe):
        monkeypatch.setattr(module, "load_model_and_tokenizer", refuse)


UNLEARN_CASES = {
    "validation file": (["--val-forget", "{tmp}/missing.jsonl", "--val-retain", "{data}/retain.jsonl",
                         "--set", "validation.metric=task_aggregate"], "missing.jsonl: no such file"),
    "validation mia directory": (["--val-forget", "{data}/forget.jsonl", "--val-retain", "{data}/retain.jsonl",
                                  "--val-members", "{tmp}", "--val-nonmembers", "{tmp}",
                                  "--set", "validation.metric=mia_score"], "member.jsonl: no such file"),
    "hub data split": (["--forget", "unlearnlm-test/no-data:train"], "not found in the local Hugging Face cache"),
    "tokenizer": (["--tokenizer", f"{REPO}@v9"], "not found in the local Hugging Face cache"),
    "layer": (["--set", "layers.last_k=7"], "the model has 2 layers"),
    "raw document": (["--forget", "{tmp}/one-word.jsonl"], "at least two words"),
}


@pytest.mark.parametrize("case", sorted(UNLEARN_CASES))
def test_unlearn_checks_before_loading(case, no_loading, hub_cache, micro_data_dir, tmp_path, capsys):
    (tmp_path / "one-word.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    extra, message = UNLEARN_CASES[case]
    args = {"--model": REPO, "--forget": str(micro_data_dir / "forget.jsonl"),
            "--retain": str(micro_data_dir / "retain.jsonl"), "--out": str(tmp_path / "out")}
    rest = []
    for index in range(0, len(extra), 2):
        option, value = extra[index], extra[index + 1].format(tmp=tmp_path, data=micro_data_dir)
        if option in args:
            args[option] = value
        else:
            rest += [option, value]
    code = run_cli("unlearn", *[item for pair in args.items() for item in pair], *rest)
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error, error


@pytest.mark.parametrize("option, message", [("--mia-members", "member.jsonl: no such file"),
                                             ("--mmlu", "")])
def test_eval_checks_before_loading(option, message, no_loading, micro_model_dir, micro_data_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    mia = ["--mia-members", empty, "--mia-nonmembers", empty] if option == "--mia-members" else ["--mmlu", empty]
    code = run_cli("eval", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl",
                   "--retain", micro_data_dir / "retain.jsonl", *mia, "--out", tmp_path / "out")
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error, error
