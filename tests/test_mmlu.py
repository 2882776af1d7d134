"""MMLU from local files: the Open-Instruct prompt, and accuracy with a model whose choices we control."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from unlearnlm.errors import UserError
from unlearnlm.evaluation.mmlu import build_prompt, choice_token_ids, evaluate_mmlu, fitted_prompt, lm_eval_mmlu, load_mmlu

DEV = {
    "abstract_algebra": [["What is 1+1?", "1", "2", "3", "4", "B"],
                         ["Is Z a group under +?", "Yes", "No", "Maybe", "Never", "A"]],
    "world_religions": [["Which city has the Kaaba?", "Rome", "Mecca", "Delhi", "Lhasa", "B"]],
}
TEST = {
    "abstract_algebra": [["Order of Z_4?", "1", "2", "3", "4", "D"], ["Is S_3 abelian?", "Yes", "No", "Both", "Neither", "B"],
                         ["Identity of (Z, +)?", "0", "1", "-1", "None, of course", "A"]],
    "world_religions": [["Where was Buddha born?", "Lumbini", "Rome", "Kyoto", "Cairo", "A"],
                        ["Holy book of Sikhism?", "Quran", "Bible", "Guru Granth Sahib", "Vedas", "C"]],
}
# What the fake model answers for each test question: 2 of 3 right, then 1 of 2 right.
MODEL_CHOICE = {"Order of Z_4?": "D", "Is S_3 abelian?": "A", "Identity of (Z, +)?": "A",
                "Where was Buddha born?": "A", "Holy book of Sikhism?": "B"}


def write_csvs(root: Path) -> Path:
    for split, table in (("dev", DEV), ("test", TEST)):
        (root / split).mkdir(parents=True)
        for subject, rows in table.items():
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    return root


class ChoosingModel(torch.nn.Module):
    """Next-token logits that put the highest probability on the letter chosen for the question
    in the prompt; records each prompt it is shown (decoded from the unpadded tokens)."""

    def __init__(self, tokenizer, choice: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.choice, self.seen = tokenizer, choice, []
        self.letter_ids = dict(zip("ABCD", choice_token_ids(tokenizer)))

    def forward(self, input_ids, attention_mask, position_ids):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            assert position_ids[row, real].tolist() == list(range(int(real.sum())))
            prompt = self.tokenizer.decode(input_ids[row, real].tolist())
            self.seen.append(prompt)
            question = prompt.rsplit("\n\n", 1)[-1].split("\n", 1)[0]
            logits[row, -1, self.letter_ids[self.choice[question]]] = 5.0
        return SimpleNamespace(logits=logits)


def test_prompt_text_is_open_instruct_format(tmp_path):
    subject = load_mmlu(write_csvs(tmp_path))[0]
    assert subject.name == "abstract_algebra"
    prompt = build_prompt(subject, subject.test[2], shots=2)
    assert prompt == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Is Z a group under +?\nA. Yes\nB. No\nC. Maybe\nD. Never\nAnswer: A\n\n"
        "Identity of (Z, +)?\nA. 0\nB. 1\nC. -1\nD. None, of course\nAnswer:"
    )


def test_accuracy_per_subject_and_micro_average(tmp_path, micro_tokenizer):
    subjects = load_mmlu(write_csvs(tmp_path))
    model = ChoosingModel(micro_tokenizer, MODEL_CHOICE)
    result = evaluate_mmlu(model, micro_tokenizer, subjects, shots=5, batch_size=2)
    assert result["subject_acc"] == {"abstract_algebra": pytest.approx(2 / 3), "world_religions": 0.5}
    assert result["average_acc"] == pytest.approx(3 / 5)  # micro: 3 of 5 questions, not the mean of 2/3 and 1/2
    assert result["n_questions"] == 5 and result["below_threshold"] is False
    expected_prompts = {build_prompt(subject, question, 5) for subject in subjects for question in subject.test}
    assert set(model.seen) == expected_prompts


def test_below_threshold_is_flagged(tmp_path, micro_tokenizer):
    subjects = load_mmlu(write_csvs(tmp_path))
    always_a = ChoosingModel(micro_tokenizer, dict.fromkeys(MODEL_CHOICE, "A"))
    result = evaluate_mmlu(always_a, micro_tokenizer, subjects, shots=0)
    assert result["average_acc"] == pytest.approx(2 / 5) and result["below_threshold"] is False
    always_c = ChoosingModel(micro_tokenizer, dict.fromkeys(MODEL_CHOICE, "C"))
    assert evaluate_mmlu(always_c, micro_tokenizer, subjects)["below_threshold"] is True


def test_shots_are_dropped_to_fit_the_token_limit(tmp_path, micro_tokenizer):
    subject = load_mmlu(write_csvs(tmp_path))[0]
    question = subject.test[0]
    zero_shot = len(micro_tokenizer(build_prompt(subject, question, 0), add_special_tokens=False)["input_ids"])
    one_shot = len(micro_tokenizer(build_prompt(subject, question, 1), add_special_tokens=False)["input_ids"])
    assert fitted_prompt(micro_tokenizer, subject, question, 5, max_tokens=one_shot) == build_prompt(subject, question, 1)
    assert fitted_prompt(micro_tokenizer, subject, question, 5, max_tokens=zero_shot - 1) == build_prompt(subject, question, 0)


def test_parquet_layout_matches_the_csv_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, table in (("dev", DEV), ("test", TEST)):
        rows = [{"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(row[5])}
                for subject, subject_rows in table.items() for row in subject_rows]
        (tmp_path / "parquet" / "all").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / "all" / f"{split}-00000-of-00001.parquet")
    assert load_mmlu(tmp_path / "parquet") == load_mmlu(write_csvs(tmp_path / "csv"))


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such MMLU directory"):
        load_mmlu(tmp_path / "missing")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text("question,A,B,C,D\n")
    with pytest.raises(UserError, match="6 columns"):
        load_mmlu(tmp_path)
    (tmp_path / "test" / "anatomy_test.csv").write_text("question,A,B,C,D,E\n")
    with pytest.raises(UserError, match="not one of A, B, C, D"):
        load_mmlu(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_adapter_explains_the_missing_extra(micro_tokenizer):
    with pytest.raises(UserError, match=r"unlearnlm\[lm-eval\]"):
        lm_eval_mmlu(torch.nn.Linear(1, 1), micro_tokenizer)
