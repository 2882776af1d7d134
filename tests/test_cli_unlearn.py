import json
import subprocess
import sys

import pytest


def cli(*args):
    return subprocess.run([sys.executable, "-m", "unlearnlm", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing_model", "missing_field", "empty_forget", "unknown_key"])
def test_bad_input_is_one_line_and_exit_code_2(case, micro_model_dir, micro_data_dir, tmp_path):
    forget, retain, model, extra = micro_data_dir / "forget.jsonl", micro_data_dir / "retain.jsonl", micro_model_dir, []
    if case == "missing_model":
        model = tmp_path / "no-model"
    elif case == "missing_field":
        forget = tmp_path / "bad.jsonl"
        forget.write_text(json.dumps({"id": "1sc1", "input": "a", "task": "Task1"}) + "\n")
    elif case == "empty_forget":
        forget = tmp_path / "empty.jsonl"
        forget.write_text("")
    else:
        extra = ["--set", "optim.learning_rate=1"]
    result = cli("unlearn", "--model", model, "--forget", forget, "--retain", retain, "--out", tmp_path / "out", *extra)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_unlearn_command_writes_a_loadable_model(micro_model_dir, micro_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl",
                 "--retain", micro_data_dir / "retain.jsonl", "--out", tmp_path / "out", "--config", "configs/demo.yaml",
                 "--set", "optim.max_steps=2", "--set", "max_length=48", "--method", "npo")
    assert result.returncode == 0, result.stderr
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["method"] == "npo" and run["steps"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
