"""Utility, the MMLU stand-in: the seeded distractor draw and the option log-likelihoods."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LUME, make_micro_model

from unlearnlm.data.records import Record, load_records
from unlearnlm.evaluation.utility import build_choice_items, option_loglikelihoods, utility_score


@pytest.fixture(scope="module")
def general() -> list[Record]:
    # The first 4 documents of each task of validation retain, as the mini preset draws G.
    rows = load_records(LUME / "validation" / "retain.jsonl", "retain")
    documents: dict[str, list[str]] = {}
    for row in rows:
        task_documents = documents.setdefault(row.task, [])
        if row.document_id not in task_documents and len(task_documents) < 4:
            task_documents.append(row.document_id)
    keep = {document for task_documents in documents.values() for document in task_documents}
    return [row for row in rows if row.document_id in keep]


def test_each_question_gets_four_distinct_options_with_its_answer(general):
    items = build_choice_items(general)
    assert len(items) == sum(1 for row in general if row.kind == "qa")
    answers = {row.id: row.output for row in general}
    for item in items:
        assert len(item.options) == 4
        assert len({option.strip().lower() for option in item.options}) == 4
        assert item.options[item.answer_index] == answers[item.id]


def test_distractors_come_from_the_same_task_and_question_slot(general):
    by_slot: dict[tuple[str, str], set[str]] = {}
    for row in general:
        by_slot.setdefault((row.task, row.id[-3:]), set()).add(row.output)
    for item in build_choice_items(general):
        # 4 documents per task give every slot 3 other answers: the draw never needs to look further.
        assert set(item.options) <= by_slot[item.task, item.id[-3:]]


def test_the_draw_is_seeded_and_falls_back_when_a_slot_is_short(general):
    assert build_choice_items(general) == build_choice_items(list(general))
    assert build_choice_items(general, seed=1) != build_choice_items(general)
    two_documents = [row for row in general if row.task == "Task2"][:12]  # 2 people: 1 other answer per slot
    for item in build_choice_items(two_documents):
        assert len(item.options) == 4  # filled from the other Task2 slots


def test_option_loglikelihoods_are_the_summed_continuation_logprobs(general, micro_tokenizer):
    model = make_micro_model(len(micro_tokenizer)).eval()
    items = build_choice_items(general)[:3]
    scores = option_loglikelihoods(model, micro_tokenizer, items, batch_size=5)
    for item, item_scores in zip(items, scores):
        prompt = micro_tokenizer(item.question)["input_ids"]
        for option, score in zip(item.options, item_scores):
            continuation = micro_tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + continuation])).logits[0].log_softmax(-1)
            expected = sum(logits[len(prompt) - 1 + offset, token].item() for offset, token in enumerate(continuation))
            assert score == pytest.approx(expected, abs=1e-4)


def test_utility_is_the_accuracy_of_the_most_likely_option(monkeypatch):
    # A hand-made G: Task1 has 4 people (4 distinct qa0 answers, so each question's options are exactly
    # those 4), Task2 has 5 (each question gets its answer and 3 of the 4 others); one sc row to skip.
    answers = {"Task1": ["Paris", "Rome", "Oslo", "Lima"], "Task2": ["1901", "1902", "1903", "1904", "1905"]}
    general = [Record(f"{task}{index}qa0", f"{task} question {index}?", answer, task, "general")
               for task, task_answers in answers.items() for index, answer in enumerate(task_answers)]
    general.append(Record("Task1x9sc1", "Task1 completion", "a sentence", "Task1", "general"))
    true_answer = {row.input: row.output for row in general if row.kind == "qa"}
    # The fake model knows Task1 questions 0, 1, 2 (not 3) and Task2 question 0 (not 1-4).
    known = {"Task1 question 0?", "Task1 question 1?", "Task1 question 2?", "Task2 question 0?"}

    def fake_loglikelihoods(model, tokenizer, items, *args, **kwargs):
        # Known question: its true answer scores 0, every other option -1, so the answer wins.
        # Unknown question: the true answer scores -1, every other option -0.5, so a wrong option wins.
        return [[(0.0 if item.question in known else -1.0) if option == true_answer[item.question] else
                 (-1.0 if item.question in known else -0.5) for option in item.options] for item in items]

    monkeypatch.setattr("unlearnlm.evaluation.utility.option_loglikelihoods", fake_loglikelihoods)
    result = utility_score(None, None, general)
    # By hand: Task1 3 of 4 right, Task2 1 of 5 right, together 4 of 9 (not the mean of the task
    # accuracies, (3/4 + 1/5) / 2 = 0.475).
    assert result["n_questions"] == 9
    assert result["per_task"] == {"Task1": pytest.approx(3 / 4), "Task2": pytest.approx(1 / 5)}
    assert result["accuracy"] == pytest.approx(4 / 9)
    for prediction in result["predictions"]:
        question = next(row.input for row in general if row.id == prediction["id"])
        picked = prediction["options"][prediction["predicted"]]
        assert (picked == true_answer[question]) == (question in known), prediction
    assert json.dumps(result)  # plain data, ready for evaluation_results.json


def test_utility_first_maximum_wins_a_tie(monkeypatch):
    # Every option scores the same: the prediction is option 0, right only where the answer was drawn first.
    general = [Record(f"Task1{index}qa0", f"question {index}?", answer, "Task1", "general")
               for index, answer in enumerate(["Paris", "Rome", "Oslo", "Lima", "Bern", "Kyiv", "Riga", "Rabat"])]
    monkeypatch.setattr("unlearnlm.evaluation.utility.option_loglikelihoods",
                        lambda model, tokenizer, items, *args, **kwargs: [[-1.0] * len(item.options) for item in items])
    result = utility_score(None, None, general)
    assert [prediction["predicted"] for prediction in result["predictions"]] == [0] * 8
    # Count by hand over the drawn option lists: how many put the true answer first.
    answers = {row.id: row.output for row in general}
    first_is_answer = sum(prediction["options"][0] == answers[prediction["id"]] for prediction in result["predictions"])
    assert 0 < first_is_answer < 8  # the seeded shuffle puts the answer first for some, not all
    assert result["accuracy"] == pytest.approx(first_is_answer / 8)
