"""Generation parity, the evaluator end to end, the written report, and the eval command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_micro_model
from rouge_score import rouge_scorer

from unlearnlm.cli import main
from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import encode_prompt
from unlearnlm.evaluation.evaluator import evaluate_model, quick_scores
from unlearnlm.evaluation.generation import decode_new_tokens, generate_batched, generate_official
from unlearnlm.evaluation.inputs import documents_from_rows
from unlearnlm.evaluation.likelihood import TokenCache
from unlearnlm.evaluation.report import REDACTED, write_report
from unlearnlm.evaluation.scoring import headline

MAX_NEW = 6
PROMPT_CHARS = 300  # shorter prompts keep the micro model fast


def records(rows: list[dict], split: str) -> list[Record]:
    return [Record(row["id"], row["input"], row["output"], row["task"], split) for row in rows]


def varied_prompts(tokenizer, lume_rows) -> list[list[int]]:
    # Lengths from a few tokens to a few hundred, so every batch pads some rows.
    texts = [row["input"][:length] for row, length in zip(lume_rows["retain"], (15, 400, 60, 5, 200))]
    return [encode_prompt(tokenizer, text) for text in texts]


def test_shared_tokenization_equals_the_official_per_prompt_call(micro_tokenizer, lume_rows):
    texts = [row["input"] for row in lume_rows["forget"]]
    cache = TokenCache()
    assert cache.encode(micro_tokenizer, texts) == [encode_prompt(micro_tokenizer, text) for text in texts]
    assert cache.encode(micro_tokenizer, texts) is cache.encode(micro_tokenizer, list(texts))  # tokenized once


def test_decoding_applies_the_transformers_4_clean_up(micro_tokenizer):
    # transformers 5 skips this clean-up for BPE tokenizers; the official strings went through it.
    ids = micro_tokenizer("She said , it is n't over .", add_special_tokens=False)["input_ids"] + [micro_tokenizer.eos_token_id]
    assert decode_new_tokens(micro_tokenizer, ids) == "She said, it isn't over."


@pytest.mark.parametrize("arch", ["llama", "olmo"])
def test_batched_generation_equals_official(arch, micro_tokenizer, lume_rows):
    model = make_micro_model(len(micro_tokenizer), arch)
    prompts = varied_prompts(micro_tokenizer, lume_rows)
    official = generate_official(model, micro_tokenizer, prompts, max_new_tokens=MAX_NEW)
    assert generate_batched(model, micro_tokenizer, prompts, batch_size=3, max_new_tokens=MAX_NEW) == official
    # Regrouped after 1 and 3 new tokens: the running rows go on in new batches with the keys and
    # values they carry, so only the first round's two batches read more than one token per row.
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    regrouped = generate_batched(model, micro_tokenizer, prompts, batch_size=3, max_new_tokens=MAX_NEW, regroup_after=(1, 3))
    hook.remove()
    assert regrouped == official
    assert len([width for width in widths if width > 1]) == 2 and len(widths) > 2
    assert len(set(official)) > 1


def test_rounds_run_up_to_each_regrouping_point_then_to_the_limit():
    from unlearnlm.evaluation.generation import _round_limits

    assert _round_limits(256, (32, 96)) == [32, 64, 160]
    assert _round_limits(6, (3, 1, 3)) == [1, 2, 3]
    assert _round_limits(6, (6, 9)) == [6]  # points at or past the limit add no round
    assert _round_limits(6, ()) == [6]


def test_each_sequence_stops_at_its_own_eos(micro_tokenizer, lume_rows):
    model = make_micro_model(len(micro_tokenizer))
    prompts = varied_prompts(micro_tokenizer, lume_rows)[:4]
    first = model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    new_tokens = first[0, len(prompts[0]):].tolist()
    # Make the third token prompt 0 generates the stop token: prompt 0 stops there, the others run on.
    stop = new_tokens[2]
    model.generation_config.eos_token_id = stop
    official = generate_official(model, micro_tokenizer, prompts, max_new_tokens=MAX_NEW)
    assert official[0] == decode_new_tokens(micro_tokenizer, new_tokens[:new_tokens.index(stop) + 1])
    assert generate_batched(model, micro_tokenizer, prompts, batch_size=4, max_new_tokens=MAX_NEW) == official
    # Prompt 0 is still running at the regrouping point (2 tokens) and stops in the next round.
    assert generate_batched(model, micro_tokenizer, prompts, batch_size=4, max_new_tokens=MAX_NEW, regroup_after=(2,)) == official


@pytest.fixture(scope="module")
def eval_inputs(micro_tokenizer, lume_rows):
    """Rows whose expected outputs are built from the model's own greedy generations, so that the
    scores are neither all 0 nor all 1 and none of the 12 terms is 0 (one zero term makes the
    harmonic mean 0, whatever the others): in forget every question of a task but its last is
    answered exactly (up to outer whitespace), in retain only the first of each task; each
    completion's reference is the generation followed by the true output."""
    model = make_micro_model(len(micro_tokenizer), seed=3)
    retain = lume_rows["retain"]
    # Retain rows of all three tasks (a Task2, a Task3 and a Task1 document); G and the nonmembers from others.
    split_rows = {"forget": lume_rows["forget"], "retain": retain[0:6] + retain[12:14] + retain[20:22]}
    generated = generate_batched(model, micro_tokenizer, [encode_prompt(micro_tokenizer, row["input"][:PROMPT_CHARS])
                                                         for rows in split_rows.values() for row in rows], 8, MAX_NEW)
    questions = Counter((split, row["task"]) for split, rows in split_rows.items() for row in rows if row["id"][-3:-1] == "qa")
    data, position, seen = {}, 0, Counter()
    for split, rows in split_rows.items():
        data[split] = []
        for row in rows:
            generation, output = generated[position], row["output"]
            position += 1
            if row["id"][-3:-1] == "sc":
                output = generation + " " + output
            else:
                seen[split, row["task"]] += 1
                number, count = seen[split, row["task"]], questions[split, row["task"]]
                answered = number < count if split == "forget" else number == 1
                output = f"  {generation} " if answered else output
            data[split].append(Record(row["id"], row["input"][:PROMPT_CHARS], output, row["task"], split))
    members = documents_from_rows(data["forget"])
    nonmembers = [row["input"] for row in retain[6:12] + retain[14:20] + retain[22:24] if row["id"][-3:-1] == "sc"]
    general = records(retain[6:12] + retain[22:24], "general")
    return model, data, members, nonmembers, general


@pytest.fixture(scope="module")
def evaluated(eval_inputs, micro_tokenizer):
    model, data, members, nonmembers, general = eval_inputs
    return evaluate_model(model, micro_tokenizer, data["forget"], data["retain"], members, nonmembers, general,
                          batch_size=8, max_new_tokens=MAX_NEW, redact=True)


def official_recomputation(rows: list[dict], member_losses: list[float], nonmember_losses: list[float], utility: float) -> dict:
    """The organizers' compute_metrics as docs/scoring.md defines it, restated without
    unlearnlm.evaluation.scoring (nor the sklearn and statistics calls it makes)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def kind(row: dict) -> str:  # the official rule: id[:-1] ends in "sc" or "qa"
        return "sc" if row["id"][:-1].endswith("sc") else "qa" if row["id"][:-1].endswith("qa") else "?"

    per_row = {}
    for row in rows:
        if kind(row) == "sc":  # regurgitation: ROUGE-L recall of the generation against the output
            per_row[row["id"]] = scorer.score(target=row["output"], prediction=row["generation"])["rougeL"].recall
        else:  # knowledge: the whole generation is the answer, up to case and outer whitespace
            assert kind(row) == "qa", row["id"]
            per_row[row["id"]] = 1 if row["output"].strip().lower() == row["generation"].strip().lower() else 0
    # 12 terms: forget then retain, tasks in sorted order, regurgitation (sc) then knowledge (qa).
    raw, terms = {}, []
    for split in ("forget", "retain"):
        for task in ("Task1", "Task2", "Task3"):
            for row_kind in ("sc", "qa"):
                values = [per_row[row["id"]] for row in rows
                          if row["split"] == split and row["task"] == task and kind(row) == row_kind]
                mean = sum(values) / len(values)
                raw[split, task, row_kind] = mean
                terms.append(1 - mean if split == "forget" else mean)
    task_aggregate = 0.0 if 0 in terms else len(terms) / sum(1 / term for term in terms)
    # Loss attack AUC, members labelled 1 and score -loss: the share of (member, nonmember) pairs in
    # which the member has the lower loss, a tie counting 1/2 (what roc_curve + auc integrate to).
    pairs = [(member, nonmember) for member in member_losses for nonmember in nonmember_losses]
    mia_auc = sum(1.0 if member < nonmember else 0.5 if member == nonmember else 0.0
                  for member, nonmember in pairs) / len(pairs)
    mia = 1 - 2 * abs(mia_auc - 0.5)
    return {"per_row": per_row, "raw": raw, "terms": terms, "task_aggregate": task_aggregate, "mia_auc": mia_auc,
            "mia": mia, "final": (task_aggregate + mia + utility) / 3}


def test_written_scores_equal_the_official_recomputation(evaluated, tmp_path):
    out = write_report([("micro", evaluated)], tmp_path / "report")
    written = json.loads((out / "evaluation_results.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 + 10 and set(rows[0]) == {"id", "task", "kind", "split", "input", "output", "generation", "score"}
    # Utility (the final score's third term) by counting the written predictions.
    predictions = written["utility_details"]["predictions"]
    assert written["utility"] == sum(item["predicted"] == item["answer"] for item in predictions) / len(predictions)
    mia = written["mia"]
    expected = official_recomputation(rows, mia["member_losses"], mia["nonmember_losses"], written["utility"])
    for row in rows:
        assert row["score"] == pytest.approx(expected["per_row"][row["id"]], abs=1e-9)
    for (split, task, kind), mean in expected["raw"].items():
        metric = "regurgitation-score" if kind == "sc" else "knowledge-score"
        assert written[f"{split}-set"][task][metric] == pytest.approx(mean, abs=1e-9)
    assert len(written["aggregated-terms"]) == 12
    assert written["aggregated-terms"] == pytest.approx(expected["terms"], abs=1e-9)
    assert written["harmonic-mean-task-aggregate"] == pytest.approx(expected["task_aggregate"], abs=1e-9)
    assert written["mia_loss_acc"] == pytest.approx(expected["mia_auc"], abs=1e-9)
    assert written["mia_final_score"] == pytest.approx(expected["mia"], abs=1e-9)
    assert written["aggregate-score"] == pytest.approx(expected["final"], abs=1e-9)
    # The crafted outputs make the scores informative: some but not all questions answered, no zero
    # term (which would make the harmonic mean 0 whatever the other terms), an MIA score off 0 and 1.
    knowledge = [row["score"] for row in rows if row["kind"] == "qa"]
    assert 0 < sum(knowledge) < len(knowledge)
    assert all(term > 0 for term in expected["terms"]) and 0 < expected["task_aggregate"] < 1
    assert 0 < expected["mia"] < 1


def test_results_carry_the_details(evaluated):
    assert set(evaluated["mia"]["attacks"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    assert evaluated["utility_details"]["n_questions"] == 5 + 1  # the Task2 document's and the Task3 document's questions
    assert len(evaluated["aggregated-term-labels"]) == len(evaluated["aggregated-terms"])
    assert evaluated["settings"]["redact"] is True and evaluated["settings"]["official"] is False


def test_redaction_masks_forget_text_in_the_summary_only(evaluated, tmp_path):
    out = write_report([("micro", evaluated)], tmp_path / "report")
    summary = (out / "summary.md").read_text()
    def first_true_answer(split: str) -> str:
        return next(row["output"] for row in evaluated["generations"]
                    if row["split"] == split and row["kind"] == "qa" and not row["output"].startswith(" "))

    assert REDACTED in summary and first_true_answer("forget") not in summary
    assert first_true_answer("retain") in summary
    written = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert first_true_answer("forget") in [row["output"] for row in written]


def test_report_refuses_a_non_empty_directory_unless_overwrite(evaluated, tmp_path):
    from unlearnlm.errors import UserError

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "old.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder that holds no unlearnlm output is never replaced
        with pytest.raises(UserError, match="holds no unlearnlm output"):
            write_report([("micro", evaluated)], foreign, overwrite=overwrite)
    assert (foreign / "old.txt").read_text() == "keep me"
    out = write_report([("micro", evaluated)], tmp_path / "report")
    with pytest.raises(UserError, match="not empty"):
        write_report([("micro", evaluated)], out)
    write_report([("a", evaluated), ("b", evaluated)], out, overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == ["a", "b", "summary.md"]
    assert (out / "a" / "evaluation_results.json").is_file()
    assert "| a |" in (out / "summary.md").read_text()
    assert not list(tmp_path.glob(".report*"))  # no staging directory left behind


def test_quick_scores_match_the_full_evaluation_and_keep_train_mode(eval_inputs, evaluated, micro_tokenizer):
    model, data, members, nonmembers, general = eval_inputs
    model.train()
    quick = quick_scores(model, micro_tokenizer, data["forget"], data["retain"], members, nonmembers, general,
                         batch_size=8, max_new_tokens=MAX_NEW)
    assert model.training
    assert quick == pytest.approx(headline(evaluated))
    assert quick["final"] is not None


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["unlearnlm", "eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_eval_command_compares_models(micro_model_dir, micro_data_dir, tmp_path, monkeypatch, capsys):
    forget, retain = str(micro_data_dir / "forget.jsonl"), str(micro_data_dir / "retain.jsonl")
    code, _ = run_cli(monkeypatch, capsys, "--model", str(micro_model_dir), "--model", str(micro_model_dir),
                      "--forget", forget, "--retain", retain, "--mia-members", forget, "--mia-nonmembers", retain,
                      "--max-new-tokens", "3", "--batch-size", "12", "--out", str(tmp_path / "out"))
    assert code == 0
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == [f"{micro_model_dir.name}-1", f"{micro_model_dir.name}-2", "summary.md"]
    first, second = (json.loads((tmp_path / "out" / name / "evaluation_results.json").read_text()) for name in names[:2])
    assert first["aggregated-terms"] == second["aggregated-terms"]
    assert first["mia_loss_acc"] == second["mia_loss_acc"]


def test_eval_command_bad_inputs_exit_2(micro_model_dir, micro_data_dir, tmp_path, monkeypatch, capsys):
    data = ["--forget", str(micro_data_dir / "forget.jsonl"), "--retain", str(micro_data_dir / "retain.jsonl")]
    no_config = tmp_path / "not_a_model"
    no_config.mkdir()
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"id": "1sc1", "input": "x"}\n')
    cases = {
        "no config.json": ["--model", str(no_config), *data],
        "no such file": ["--model", str(micro_model_dir), "--forget", str(tmp_path / "missing.jsonl"), "--retain", str(bad_rows)],
        "missing field": ["--model", str(micro_model_dir), "--forget", str(bad_rows), "--retain", str(bad_rows)],
        "go together": ["--model", str(micro_model_dir), *data, "--mia-members", str(micro_data_dir / "forget.jsonl")],
    }
    for message, args in cases.items():
        code, err = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"))
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
    assert not (tmp_path / "out").exists()


def test_eval_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unlearnlm", "eval", "--model", str(tmp_path / "none"), "--forget", "f", "--retain", "r",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none'}: no such model directory"


def test_growing_cache_layer_holds_what_concatenation_holds(monkeypatch):
    from unlearnlm.evaluation.generation import GrowingLayer

    monkeypatch.setattr(GrowingLayer, "spare", 2)  # so that decoding outgrows the buffers twice
    layer, generator = GrowingLayer(), torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 2, length, 4, generator=generator) for length in (5, 1, 1, 1, 1, 1, 2)]
    for index, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[:index + 1], dim=-2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected) and layer.get_seq_length() == expected.shape[-2]
    layer.batch_select_indices(torch.tensor([2, 0]))
    keys, _ = layer.update(chunks[1][:2], chunks[1][:2])
    assert torch.equal(keys, torch.cat([torch.cat(chunks, dim=-2)[[2, 0]], chunks[1][:2]], dim=-2))
    layer.crop(-3)
    assert torch.equal(layer.update(chunks[1][:2], chunks[1][:2])[0][..., -1:, :], chunks[1][:2])
    assert layer.get_seq_length() == 12 + 1 - 3 + 1


def test_batched_generation_equals_official_when_the_cache_outgrows_its_room(monkeypatch, micro_tokenizer, lume_rows):
    from unlearnlm.evaluation.generation import GrowingLayer

    monkeypatch.setattr(GrowingLayer, "spare", 3)
    model = make_micro_model(len(micro_tokenizer))
    prompts = varied_prompts(micro_tokenizer, lume_rows)
    official = generate_official(model, micro_tokenizer, prompts, max_new_tokens=MAX_NEW)
    assert generate_batched(model, micro_tokenizer, prompts, batch_size=3, max_new_tokens=MAX_NEW) == official
