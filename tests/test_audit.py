"""`unlearnlm audit`: the attacks' building blocks against hand-worked examples, the sanity of every
attack on the memorized micro target and on a model that never saw F, and the receipt's redaction.

The oracle here is the session's random micro model (``micro_model_dir``): it never saw the forget
set, which is all an oracle must guarantee (it has its own tokenizer, which the audit allows).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from unlearnlm.audit import attacks
from unlearnlm.audit.attacks import SamplingBudget, quantize, shortened, split_documents, with_document_context
from unlearnlm.audit.receipt import RECEIPT_JSON, RECEIPT_MD, build_receipt, write_receipt
from unlearnlm.audit.run import AuditSettings, best_rows, run_audit, worst_case
from unlearnlm.data.records import Record, load_documents, load_records
from unlearnlm.errors import UserError
from unlearnlm.evaluation.evaluator import EvalData
from unlearnlm.model import load_model_and_tokenizer

# --- building blocks, against hand-worked values ----------------------------------------------------


def record(row_id: str, prompt: str = "q", answer: str = "a", task: str = "Task1") -> Record:
    return Record(id=row_id, input=prompt, output=answer, task=task)


def test_the_split_keeps_each_document_whole_and_the_halves_disjoint() -> None:
    rows = [record(f"doc{d}{suffix}") for d in range(5) for suffix in ("sc1", "qa0", "qa1")]
    train, held_out = split_documents(rows, seed=0)
    train_docs, held_docs = {r.document_id for r in train}, {r.document_id for r in held_out}
    assert train_docs.isdisjoint(held_docs) and train_docs | held_docs == {f"doc{d}" for d in range(5)}
    assert (len(train_docs), len(held_docs)) == (2, 3)  # T: 5 // 2 documents, V the rest
    assert len(train) == 3 * 2 and len(held_out) == 3 * 3  # every row of a document goes with it
    assert split_documents(rows, seed=0) == (train, held_out)
    assert any({r.document_id for r in split_documents(rows, seed)[0]} != train_docs for seed in range(1, 8))
    with pytest.raises(UserError, match="at least 2 forget documents"):
        split_documents([record("doc0sc1"), record("doc0qa0")], seed=0)


def test_cut_prompts_keep_their_last_words() -> None:
    row = record("d1sc1", prompt="one two three four five")
    # ceil(5 x 0.5) = 3, ceil(5 x 0.25) = 2, ceil(5 x 0.1) = 1 words
    assert [shortened([row], f)[0].input for f in (0.5, 0.25, 0.1)] == ["three four five", "four five", "five"]
    assert shortened([row], 0.5)[0].output == row.output and shortened([row], 0.5)[0].id == row.id


def test_context_puts_the_documents_earlier_text_before_its_questions_never_the_scored_sentence() -> None:
    completion = record("d1sc1", prompt="Early text of d1.", answer="The secret sentence.")
    question = record("d1qa0", prompt="Who?", answer="Ann")
    orphan = record("d2qa0", prompt="When?", answer="1990")  # its document has no completion row
    attacked = with_document_context([completion, question, orphan])
    assert attacked == [completion, record("d1qa0", prompt="Early text of d1.\nWho?", answer="Ann"), orphan]


def test_best_rows_keep_each_rows_best_candidate_and_the_first_on_a_tie() -> None:
    greedy = [{"id": "a", "score": 0.5, "generation": "g"}, {"id": "b", "score": 0.2, "generation": "g"}]
    other = [{"id": "a", "score": 0.5, "generation": "o"}, {"id": "b", "score": 0.9, "generation": "o"}]
    assert best_rows([greedy, other]) == [greedy[0], other[1]]


def test_the_worst_case_takes_each_terms_lowest_value() -> None:
    attacks = {
        "none": {"terms": {"forget T1": 0.8, "retain T1": 0.5}, "scores": {"mia_score": 0.6, "utility": 0.9, "final": 0.7,
                                                                             "task_aggregate": 0.6}},
        "x": {"terms": {"forget T1": 0.4, "retain T1": 0.7}, "scores": {"mia_score": 0.2, "utility": 1.0, "final": 0.5,
                                                                          "task_aggregate": 0.5}},
    }
    worst = worst_case(attacks)
    assert worst["terms"] == {"forget T1": {"value": 0.4, "attack": "x"}, "retain T1": {"value": 0.5, "attack": "none"}}
    aggregate = 2 / (1 / 0.4 + 1 / 0.5)  # harmonic mean of the two worst terms
    assert worst["task_aggregate"] == pytest.approx(aggregate)
    assert worst["mia_score"] == {"value": 0.2, "attack": "x"} and worst["utility"] == {"value": 0.9, "attack": "none"}
    assert worst["final"] == pytest.approx((aggregate + 0.2 + 0.9) / 3)


class _Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(256, 64), torch.nn.Linear(96, 32)])
        self.lm_head = torch.nn.Linear(64, 10)


@pytest.mark.parametrize("bits, levels", [(8, 127), (4, 7)])
def test_quantization_rounds_each_weight_to_within_half_a_step_and_leaves_the_head(bits: int, levels: int) -> None:
    torch.manual_seed(0)
    model = _Decoder()
    before = [layer.weight.detach().clone() for layer in model.layers]
    head = model.lm_head.weight.detach().clone()
    quantize(model, bits)
    assert torch.equal(model.lm_head.weight, head)
    for layer, weight in zip(model.layers, before):
        # A step is the largest |weight| of the scale's group over the positive levels: the group is
        # the output row for int8, 128 inputs for int4 (the 96-wide layer: its whole row).
        group = 128 if bits == 4 and weight.shape[1] % 128 == 0 else weight.shape[1]
        grouped = weight.reshape(weight.shape[0], -1, group)
        step = grouped.abs().amax(dim=-1, keepdim=True) / levels
        error = (layer.weight.dequantize().reshape_as(grouped) - grouped).abs()
        assert (error <= step / 2 * (1 + 1e-5)).all()
        assert error.max() > step.min() / 100  # the weights did move: this is not the identity


@pytest.mark.parametrize("device, installed, expected", [
    ("cpu", True, "torchao"), ("cuda", True, "bitsandbytes"), ("cuda", False, "torchao"), ("cpu", False, "torchao")])
def test_auto_quantizes_with_bitsandbytes_only_on_a_gpu_that_has_it(device, installed, expected, monkeypatch) -> None:
    monkeypatch.setattr(attacks, "bitsandbytes_installed", lambda: installed)
    assert attacks.resolve_quantizer("auto", torch.device(device)) == expected
    assert attacks.resolve_quantizer("torchao", torch.device(device)) == "torchao"


def test_asking_for_bitsandbytes_without_it_or_for_an_unknown_library_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setattr(attacks, "bitsandbytes_installed", lambda: False)
    with pytest.raises(UserError, match=r"pip install 'unlearnlm\[bnb\]'"):
        attacks.resolve_quantizer("bitsandbytes", torch.device("cuda"))
    with pytest.raises(UserError, match="unknown quantizer 'gptq'"):
        attacks.resolve_quantizer("gptq", torch.device("cpu"))


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantizes_as_the_weights_load_onto_the_models_device(bits: int, micro_model_dir, monkeypatch) -> None:
    """What a deployment passes to transformers; the real library is exercised in the next test."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained
    seen: dict = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config"), kwargs.pop("device_map")
        return loaded(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    attacks.quantized_model(micro_model_dir, bits, "float32", "bitsandbytes")
    config = seen["quantization_config"]
    assert seen["device_map"] == {"": "cpu"} and seen["use_safetensors"] is True
    if bits == 8:
        assert config.load_in_8bit and not config.load_in_4bit and config.llm_int8_threshold == 6.0
    else:
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == torch.float32


@pytest.mark.parametrize("bits, layer", [(8, "Linear8bitLt"), (4, "Linear4bit")])
def test_bitsandbytes_quantization_really_runs_and_leaves_the_head(bits: int, layer: str, micro_target) -> None:
    """Runs where bitsandbytes is installed (pip install 'unlearnlm[bnb]'; its CPU backend will do, for
    layers at least 64 wide: the micro target's, not the random micro model's)."""
    pytest.importorskip("bitsandbytes")
    micro_model_dir = micro_target[0]
    model, tokenizer = attacks.quantized_model(micro_model_dir, bits, "float32", "bitsandbytes")
    plain, _ = attacks.quantized_model(micro_model_dir, bits, "float32", "torchao")
    kinds = {type(module).__name__ for name, module in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    assert kinds == {layer} and type(model.lm_head) is torch.nn.Linear
    ids = torch.tensor([tokenizer("Alice was born in").input_ids])
    with torch.no_grad():
        full = load_model_and_tokenizer(micro_model_dir)[0](ids).logits
        quantized, rounded = model(ids).logits, plain(ids).logits
    # Both libraries move the logits by a rounding of the same order, and neither leaves them as they were.
    bnb_change, torchao_change = (quantized - full).abs().max(), (rounded - full).abs().max()
    assert 0 < bnb_change < 10 * torchao_change and 0 < torchao_change < 10 * bnb_change


# --- the audit on the micro target and on a model that never saw F ---------------------------------------

FAST = AuditSettings(sampling=SamplingBudget(samples=4), max_new_tokens=96)


def benchmark_data(target: Path) -> EvalData:
    sets = target / "benchmark"
    return EvalData(load_records(sets / "forget.jsonl", "forget"), load_records(sets / "retain.jsonl", "retain"),
                     load_documents(sets / "mia_members.jsonl"), load_documents(sets / "mia_nonmembers.jsonl"),
                     load_records(sets / "general.jsonl", "general"))


@pytest.fixture(scope="module")
def target_audit(micro_target, micro_model_dir) -> dict:
    target = micro_target[0]
    return run_audit(target, benchmark_data(target), original=target, oracle=micro_model_dir, settings=FAST)


def test_on_the_target_no_attack_lowers_the_forget_score(target_audit) -> None:
    attacks = target_audit["models"]["audited"]["attacks"]
    assert attacks["none"]["forget_score"] > 0.9  # the target remembers F, so there is something to lower
    for name, attack in attacks.items():
        # Not the benign run: 12 passes over R make the tiny target forget some of F (docs/audit.md).
        if name != "benign-retain":
            assert attack["forget_score"] >= attack["forget_score_without_attack"], name


def test_8_bit_quantization_moves_the_targets_scores_by_at_most_0_02(target_audit) -> None:
    attacks = target_audit["models"]["audited"]["attacks"]
    plain, quantized = attacks["none"], attacks["quant-8bit"]
    for key in ("final", "task_aggregate", "mia_score", "utility", "forget_mean", "retain_mean"):
        assert abs(quantized["scores"][key] - plain["scores"][key]) <= 0.02, key
    assert plain["terms"].keys() == quantized["terms"].keys()
    assert all(abs(quantized["terms"][label] - value) <= 0.02 for label, value in plain["terms"].items())


def test_relearning_on_t_gives_the_oracle_far_less_of_v_than_the_target_holds(target_audit) -> None:
    target = target_audit["models"]["audited"]["attacks"]
    oracle = target_audit["models"]["oracle"]["attacks"]
    for name in ("relearn-lora", "relearn-full"):
        assert target[name]["scored_on"] == oracle[name]["scored_on"] == "V"
        assert oracle[name]["forget_score"] < 0.5 * target[name]["forget_score"], name
    comparison = {entry["attack"]: entry for entry in target_audit["oracle_comparison"]}
    assert comparison["relearn-full"]["excess_forget"] == pytest.approx(
        target["relearn-full"]["forget_score"] - oracle["relearn-full"]["forget_score"])


def test_the_receipt_is_redacted_by_default_and_holds_the_hashes(target_audit, micro_target, micro_model_dir,
                                                                 tmp_path: Path) -> None:
    target = micro_target[0]
    sets = target / "benchmark"
    inputs = {"model": target, "original": target, "oracle": micro_model_dir, "forget": sets / "forget.jsonl",
              "retain": sets / "retain.jsonl", "mia_members": None, "mia_nonmembers": None, "general": None}
    answers = [row.output for row in load_records(sets / "forget.jsonl", "forget") if len(row.output) > 12]
    assert answers
    for redact, directory in ((True, tmp_path / "redacted"), (False, tmp_path / "plain")):
        directory.mkdir()
        write_receipt(build_receipt(target_audit, inputs, redact=redact), directory)
        text = (directory / RECEIPT_JSON).read_text() + (directory / RECEIPT_MD).read_text()
        leaked = [answer for answer in answers if answer in text or json.dumps(answer)[1:-1] in text]
        assert (leaked == []) if redact else (leaked != [])
    receipt = json.loads((tmp_path / "redacted" / RECEIPT_JSON).read_text())
    weights = target / "model.safetensors"
    assert receipt["models"]["unlearned (audited)"]["weights_sha256"] == {
        "model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert receipt["data"]["forget"]["sha256"] == hashlib.sha256((sets / "forget.jsonl").read_bytes()).hexdigest()
    assert receipt["redacted"] is True and receipt["limits"]
    assert (tmp_path / "redacted" / "forget_scores.png").stat().st_size > 1000


# --- the command --------------------------------------------------------------------------------------


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    from unlearnlm.cli import main

    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def tree_sha256(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_the_command_writes_a_redacted_receipt_by_default_and_leaves_the_inputs(micro_model_dir, micro_data_dir,
                                                                                tmp_path: Path, capfd) -> None:
    out = tmp_path / "audit"
    inputs_before = tree_sha256(micro_model_dir), tree_sha256(micro_data_dir)
    code, _ = run_cli(["audit", "--model", str(micro_model_dir), "--forget", str(micro_data_dir / "forget.jsonl"),
                       "--retain", str(micro_data_dir / "retain.jsonl"), "--out", str(out), "--max-new-tokens", "8",
                       "--relearn-steps", "2", "--samples", "2"], capfd)
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == ["forget_scores.png", RECEIPT_JSON, RECEIPT_MD]
    receipt = json.loads((out / RECEIPT_JSON).read_text())
    assert receipt["redacted"] is True
    assert receipt["settings"]["relearn"]["steps"] == 2 and receipt["settings"]["sampling"]["samples"] == 2
    text = (out / RECEIPT_JSON).read_text() + (out / RECEIPT_MD).read_text()
    rows = load_records(micro_data_dir / "forget.jsonl", "forget")
    assert not [row.output for row in rows if row.output in text or row.input in text]
    assert {row["id"] for row in receipt["attacks"][0]["rows"]} == {row.id for row in rows}
    assert not list(tmp_path.glob(".audit.partial"))
    assert (tree_sha256(micro_model_dir), tree_sha256(micro_data_dir)) == inputs_before


@pytest.mark.parametrize("case", ["one document", "missing model", "zero rate", "unknown quantizer", "out inside the model"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, micro_model_dir, micro_data_dir, tmp_path: Path,
                                                         capfd) -> None:
    forget, out = micro_data_dir / "forget.jsonl", tmp_path / "out"
    extra: list[str] = []
    model = micro_model_dir
    if case == "one document":
        first = json.loads(forget.read_text().splitlines()[0])
        forget = tmp_path / "one.jsonl"
        forget.write_text(json.dumps(first) + "\n")
    elif case == "missing model":
        model = tmp_path / "nowhere"
    elif case == "zero rate":
        extra = ["--relearn-lr", "0"]
    elif case == "unknown quantizer":
        extra = ["--quantizer", "gptq"]
    else:
        out = micro_model_dir / "audit"
    code, lines = run_cli(["audit", "--model", str(model), "--forget", str(forget), "--retain",
                           str(micro_data_dir / "retain.jsonl"), "--out", str(out), *extra], capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists()


def test_sampled_attack_batches_several_prompts_samples_unless_told():
    # 3 prompts' worth of rows at the default factor of 4 over a batch size of 3: 12 rows.
    assert AuditSettings(batch_size=3).sampling_rows_per_batch == 12
    assert AuditSettings(batch_size=3, sampling_batch_size=5).sampling_rows_per_batch == 5
