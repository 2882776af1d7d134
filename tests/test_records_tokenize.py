import json

import pytest

from unlearnlm.data.records import load_records, row_kind
from unlearnlm.data.tokenize import IGNORE_INDEX, collate, encode_example
from unlearnlm.errors import UserError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"id": "abcsc1", "input": "The cat", "output": "sat.", "task": "Task1"}


def test_kind_from_id_suffix_as_the_official_script():
    assert row_kind('"uuid"sc1') == "sc"
    assert row_kind("123qa4") == "qa"
    with pytest.raises(UserError):
        row_kind("123xx1")


def test_loads_jsonl_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "forget.jsonl", [ROW])
    assert load_records(tmp_path / "forget.jsonl")[0].kind == "sc"
    assert load_records(tmp_path, "forget")[0].id == "abcsc1"
    official = tmp_path / "official"
    official.mkdir()
    pq.write_table(pa.Table.from_pylist([{**ROW, "id": "9qa0", "split": "retain"}]),
                   official / "retain_train-00000-of-00001.parquet")
    record = load_records(official, "retain")[0]
    assert (record.kind, record.split) == ("qa", "retain")


@pytest.mark.parametrize("rows, message", [
    ([{k: v for k, v in ROW.items() if k != "output"}], "missing field(s) output"),
    ([{**ROW, "task": 3}], "must be a string"),
    ([{**ROW, "id": "abc"}], "kind is unknown"),
    ([ROW, ROW], "duplicate row id"),
    ([], "is empty"),
])
def test_validation_errors_name_the_problem(tmp_path, rows, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_records(write(tmp_path / "f.jsonl", rows))


def test_bad_json_and_missing_path(tmp_path):
    (tmp_path / "f.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        load_records(tmp_path / "f.jsonl")
    with pytest.raises(UserError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_labels_cover_only_answer_and_eos_and_mask_keeps_real_eos(micro_tokenizer):
    tok = micro_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_example(tok, "The cat", "sat.", append_eos=True)
    long = encode_example(tok, "The cat sat on the mat and", "slept.", append_eos=True)
    prompt_len = len(tok("The cat")["input_ids"])
    assert short.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert short.labels[prompt_len:] == short.input_ids[prompt_len:]
    assert short.input_ids[-1] == tok.eos_token_id
    batch = collate([short, long], pad_id=tok.pad_token_id)
    # The short row's own EOS stays attended and labelled even though pad == EOS.
    end = len(short.input_ids) - 1
    assert batch["attention_mask"][0, end] == 1 and batch["labels"][0, end] == tok.eos_token_id
    assert batch["attention_mask"][0, end + 1:].sum() == 0
    assert (batch["labels"][0, end + 1:] == IGNORE_INDEX).all()


def test_left_padding_positions_start_at_zero(micro_tokenizer):
    tok = micro_tokenizer
    examples = [encode_example(tok, "a", "b", append_eos=True), encode_example(tok, "a longer prompt", "b", append_eos=True)]
    batch = collate(examples, tok.pad_token_id, "left")
    first_real = int((batch["attention_mask"][0] == 0).sum())
    assert batch["position_ids"][0, first_real] == 0
    assert batch["position_ids"][1, 0] == 0


@pytest.mark.parametrize("prompt, answer", [("The cat", "sat."), ("Who wrote it?", "Jane Doe"), ("x " * 5, "y z")])
def test_append_eos_adds_exactly_one_labelled_eos(micro_tokenizer, prompt, answer):
    tok = micro_tokenizer
    # The authors' construction (utils/data.py of iraklis07/llm-unlearning): the joined text tokenized
    # with the default special tokens, the first len(prompt tokens) labels masked.
    joined = tok(prompt + " " + answer)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    plain = encode_example(tok, prompt, answer, append_eos=False)
    assert plain.input_ids == joined
    assert plain.labels == [IGNORE_INDEX] * n_prompt + joined[n_prompt:]
    assert tok.eos_token_id not in plain.input_ids
    with_eos = encode_example(tok, prompt, answer, append_eos=True)
    assert with_eos.input_ids == joined + [tok.eos_token_id]
    assert with_eos.labels == plain.labels + [tok.eos_token_id]


def test_whole_document_puts_the_forget_loss_on_the_whole_text(tmp_path) -> None:
    from unlearnlm.data.records import load_records, whole_document, write_jsonl

    rows = [{"id": "42sc1", "input": "Ada Lovelace was an English", "output": "mathematician.", "task": "Task3",
             "split": "forget"},
            {"id": "42qa0", "input": "Who was Ada?", "output": "A mathematician", "task": "Task3", "split": "forget"}]
    write_jsonl(rows, tmp_path / "forget.jsonl")
    sc, qa = map(whole_document, load_records(tmp_path / "forget.jsonl", "forget"))
    assert (sc.id, sc.input, sc.output) == ("42sc1", "Ada", "Lovelace was an English mathematician.")
    assert (qa.input, qa.output) == ("Who was Ada?", "A mathematician")
