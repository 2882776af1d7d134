"""Long raw documents cut into windows of the model's context (data/windows.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_micro_model

from unlearnlm.config import load_config
from unlearnlm.data.raw import read_rows
from unlearnlm.data.tokenize import IGNORE_INDEX, Example
from unlearnlm.data.windows import Window, last_tokens, window_examples, windows
from unlearnlm.engine import Engine
from unlearnlm.evaluation.mia import document_statistics
from unlearnlm.recipe import unlearn

POSITIONS = 16  # the tiny model's context: a few sentences already overflow it


def test_windows_of_a_hand_computed_example():
    # 10 tokens, context 4, overlap 1: stride 3, the repeated token is context only.
    assert windows(10, 4, 1) == [Window(0, 4, 0), Window(3, 7, 4), Window(6, 10, 7)]
    assert windows(4, 4, 1) == [Window(0, 4, 0)]
    assert windows(5, 4, 2) == [Window(0, 4, 0), Window(2, 5, 4)]
    assert windows(16, 16) == [Window(0, 16, 0)] and windows(17, 16) == [Window(0, 16, 0), Window(12, 17, 16)]
    with pytest.raises(ValueError):
        windows(10, 4, 4)


def test_window_examples_score_every_token_once():
    ids = list(range(100, 110))
    parts = window_examples(Example(ids, ids), 4, 1)
    assert [part.input_ids for part in parts] == [ids[0:4], ids[3:7], ids[6:10]]
    assert [part.labels for part in parts] == [ids[0:4], [IGNORE_INDEX, *ids[4:7]], [IGNORE_INDEX, *ids[7:10]]]
    scored = [label for part in parts for label in part.labels if label != IGNORE_INDEX]
    assert scored == ids  # each once, in order
    assert last_tokens(ids, 3) == ids[7:] and last_tokens(ids[:2], 3) == ids[:2]


@pytest.fixture(scope="module")
def short_context(micro_tokenizer):
    return make_micro_model(len(micro_tokenizer), positions=POSITIONS).eval(), micro_tokenizer


def _independent_loss(model, ids: list[int], context: int, overlap: int) -> float:
    """Each window scored on its own; a token counts in the window that first predicts it."""
    logprobs = []
    start, scored_from = 0, 1  # the document's first token has nothing before it
    while scored_from < len(ids):
        end = min(start + context, len(ids))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:end]])).logits[0].float()
        for position in range(scored_from, end):
            logprobs.append(torch.log_softmax(logits[position - start - 1], -1)[ids[position]].item())
        start, scored_from = end - overlap, end
    return -float(np.mean(logprobs))


def test_document_loss_is_the_mean_over_its_windows(short_context, lume_rows):
    model, tokenizer = short_context
    document = lume_rows["forget"][0]["input"]
    ids = tokenizer(document)["input_ids"]
    assert len(ids) > 3 * POSITIONS
    stats = document_statistics(model, tokenizer, [document, "a short one"], batch_size=3)
    assert len(stats[0].logprobs) == len(ids) - 1  # every token but the first, once
    expected = _independent_loss(model, ids, POSITIONS, POSITIONS // 4)
    assert stats[0].mean_loss == pytest.approx(expected, rel=1e-5)


def test_a_long_raw_document_trains_on_every_window(short_context, lume_rows, tmp_path):
    model, tokenizer = short_context
    texts = [row["input"] + " " + row["output"] for row in lume_rows["forget"][:2]]
    forget = read_rows([{"text": text} for text in texts]).for_training()
    retain = read_rows([{"text": row["input"]} for row in lume_rows["retain"][:2]], "retain").for_training()
    engine = Engine(model, tokenizer, forget, retain, load_config(None, []), tmp_path, show_progress=False)
    for index, row in enumerate(forget):
        head = tokenizer(row.input)["input_ids"]
        answer = tokenizer(" " + row.output, add_special_tokens=False)["input_ids"]
        mine = [example for example in engine.examples["forget"] if example.meta["key"].startswith(f"f{index}w")]
        assert len(mine) > 1 and all(len(example.input_ids) <= POSITIONS for example in mine)
        assert [label for example in mine for label in example.labels if label != IGNORE_INDEX] == answer
        assert mine[0].input_ids[:len(head)] == head and mine[0].labels[:len(head)] == [IGNORE_INDEX] * len(head)


def test_unlearning_a_document_longer_than_the_context(short_context, lume_rows, tmp_path):
    model, tokenizer = short_context
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    for name, rows in (("forget", lume_rows["forget"][:2]), ("retain", lume_rows["retain"][:2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": row["input"] + " " + row["output"]}) + "\n"
                                                         for row in rows))
    config = load_config(None, ["optim.max_steps=3", "optim.batch_size=2"])
    unlearn(model_dir, tmp_path / "forget.jsonl", tmp_path / "retain.jsonl", tmp_path / "out", config, show_progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_long_documents_cut_prompt_keeps_its_last_tokens(short_context, monkeypatch):
    from unlearnlm.data.raw import cut_rows
    from unlearnlm.data.records import Record
    from unlearnlm.evaluation import evaluator

    model, tokenizer = short_context
    max_new_tokens = 4
    room = POSITIONS - max_new_tokens
    words = [f"word{number}" for number in range(80)]
    semeval = Record(id="r1sc1", input=" ".join(words), output="x", task="Task1")  # not a raw cut: never trimmed
    prompts = []

    def generate(model, tokenizer, asked, *settings):  # records the prompts the model would get
        prompts.extend(asked)
        return [""] * len(asked)

    monkeypatch.setattr(evaluator, "generate_texts", generate)
    data = evaluator.EvalData(cut_rows(0, " ".join(words)), [semeval])
    evaluator.generation_rows(model, tokenizer, data, evaluator.EvalSettings(max_new_tokens=max_new_tokens))
    # By hand: the cuts at a quarter, half and three quarters of 80 words are 20, 40 and 60 words;
    # each prompt, tokenized whole, keeps its last POSITIONS - max_new_tokens tokens.
    expected = []
    for cut in (20, 40, 60):
        ids = tokenizer(" ".join(words[:cut]))["input_ids"]
        assert len(ids) > room
        expected.append(ids[len(ids) - room:])
    assert prompts[:3] == expected and all(len(prompt) == room for prompt in prompts[:3])
    assert prompts[3] == tokenizer(semeval.input)["input_ids"]


def test_a_cut_is_scored_against_as_many_words_of_the_rest_as_the_generation_may_hold(short_context, monkeypatch):
    """A generation of ``max_new_tokens`` tokens cannot give back more words than that: the reference of
    a raw cut is the first ``max_new_tokens`` words of the rest. By hand, 80 words cut at 20, 40 and 60
    with max_new_tokens 4: references word20-23, word40-43 and word60-63; a model that recalls them
    scores recall 1 on each, and a SemEval row keeps its whole answer."""
    from unlearnlm.data.raw import cut_rows
    from unlearnlm.data.records import Record
    from unlearnlm.evaluation import evaluator

    model, tokenizer = short_context
    words = [f"word{number}" for number in range(80)]
    semeval = Record(id="r1sc1", input="a prompt", output="a whole answer of five words", task="Task1")
    recalled = [" ".join(words[cut:cut + 4]) for cut in (20, 40, 60)]
    monkeypatch.setattr(evaluator, "generate_texts", lambda model, tokenizer, asked, *settings: [*recalled, "a whole"])
    data = evaluator.EvalData(cut_rows(0, " ".join(words)), [semeval])
    rows = evaluator.generation_rows(model, tokenizer, data, evaluator.EvalSettings(max_new_tokens=4))
    assert [row["output"] for row in rows[:3]] == recalled
    assert [row["score"] for row in rows[:3]] == [1.0, 1.0, 1.0]
    assert rows[3]["output"] == semeval.output and rows[3]["score"] == pytest.approx(2 / 6)
