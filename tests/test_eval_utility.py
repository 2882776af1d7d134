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


def test_utility_is_the_accuracy_of_the_most_likely_option(general, micro_tokenizer):
    model = make_micro_model(len(micro_tokenizer))
    result = utility_score(model, micro_tokenizer, general, batch_size=16)
    items = build_choice_items(general)
    scores = option_loglikelihoods(model, micro_tokenizer, items, batch_size=16)
    picks = [max(range(len(values)), key=values.__getitem__) for values in scores]
    assert result["accuracy"] == sum(pick == item.answer_index for pick, item in zip(picks, items)) / len(items)
    assert set(result["per_task"]) == {"Task1", "Task2", "Task3"}
    assert json.dumps(result)  # plain data, ready for evaluation_results.json
