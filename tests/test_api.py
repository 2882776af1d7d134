"""The Python API: the same weights as the command line from the same seed, rows in memory, raw
documents end to end, and the README's example run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli
from rouge_score import rouge_scorer
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"
SETTINGS = ["optim.max_steps=2", "max_length=32", "optim.lr=1e-3"]


def test_the_api_gives_the_weights_the_cli_gives(micro_model_dir, micro_data_dir, lume_rows, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnlm import load_config, unlearn

    by_cli = tmp_path / "cli"
    assert run_cli("unlearn", "--model", micro_model_dir, "--forget", micro_data_dir / "forget.jsonl",
                   "--retain", micro_data_dir / "retain.jsonl", "--out", by_cli, "--config", "demo",
                   *[arg for setting in SETTINGS for arg in ("--set", setting)]) == 0
    # Loaded model and tokenizer, forget rows as a list of dicts, retain rows as a datasets.Dataset.
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    by_api = tmp_path / "api"
    run = unlearn(model, lume_rows["forget"], datasets.Dataset.from_list(lume_rows["retain"]), by_api,
                  load_config("demo", SETTINGS), tokenizer=tokenizer, show_progress=False)
    assert run["steps"] == 2 and run["model_source"]["in_memory"]
    cli_weights, api_weights = (load_file(str(out / "model.safetensors")) for out in (by_cli, by_api))
    assert sorted(cli_weights) == sorted(api_weights)
    assert all((cli_weights[name] == api_weights[name]).all() for name in cli_weights)
    before = load_file(str(micro_model_dir / "model.safetensors"))
    assert any((before[name] != api_weights[name]).any() for name in before)  # two steps moved the weights


def raw_documents(rows: list[dict]) -> list[dict]:
    return [{"body": row["input"] + " " + row["output"]} for row in rows if row["id"][-3:-1] == "sc"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_raw_documents_are_unlearned_and_scored_by_regurgitation(micro_model_dir, lume_rows, tmp_path):
    forget = write_jsonl(tmp_path / "forget.jsonl", raw_documents(lume_rows["forget"]))
    retain = write_jsonl(tmp_path / "retain.jsonl", raw_documents(lume_rows["retain"][:12]))
    unseen = write_jsonl(tmp_path / "unseen.jsonl", raw_documents(lume_rows["retain"][12:]))
    out, report = tmp_path / "unlearned", tmp_path / "report"
    assert run_cli("unlearn", "--model", micro_model_dir, "--forget", forget, "--retain", retain, "--out", out,
                   "--text-key", "body", "--config", "demo", "--set", "optim.max_steps=1", "--set", "max_length=32") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["raw_documents"] and run["data"]["forget_rows"] == len(raw_documents(lume_rows["forget"]))

    assert run_cli("eval", "--model", out, "--forget", forget, "--retain", retain, "--mia-members", forget,
                   "--mia-nonmembers", unseen, "--text-key", "body", "--out", report, "--max-new-tokens", 8) == 0
    results = json.loads((report / "evaluation_results.json").read_text())
    assert sorted(task for task in results["forget-set"] if not task.startswith("overall")) == ["cut25", "cut50", "cut75"]
    assert len(results["mia"]["member_losses"]) == len(raw_documents(lume_rows["forget"]))
    # Each document's prompts: its first quarter, half and three quarters of words; the reference,
    # the first 8 words (--max-new-tokens) of the rest; the score, ROUGE-L recall of the generation against it.
    document = raw_documents(lume_rows["forget"])[0]["body"]
    words = document.split(" ")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    generated = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    for percent, row in zip((25, 50, 75), generated[:3]):
        cut = round(len(words) * percent / 100)
        assert (row["input"], row["output"]) == (" ".join(words[:cut]), " ".join(words[cut:cut + 8]))
        assert row["score"] == pytest.approx(scorer.score(row["output"], row["generation"])["rougeL"].recall)


def readme_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "unlearned" / "run.json").is_file() and (tmp_path / "scores" / "evaluation_results.json").is_file()
