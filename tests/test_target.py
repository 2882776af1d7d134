"""The tiny benchmark's models: the micro base, target and oracle, their calibration, and loud failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from unlearnlm.bench.base import BASE_LOG, build_base, make_model, train_tokenizer
from unlearnlm.bench.calibration import BARS, calibration_checks
from unlearnlm.bench.sizes import RECIPES
from unlearnlm.bench.target import (
    BENCHMARK_DIR,
    LOG_NAME,
    ORACLE_DIR,
    build_target,
    cached_target,
    read_calibration,
    read_models,
)
from unlearnlm.data.records import load_documents, load_records
from unlearnlm.errors import UserError
from unlearnlm.paths import replace_dir as publish


def test_micro_target_memorized_its_sets_and_passed_calibration(micro_target) -> None:
    directory, _ = micro_target
    log = json.loads((directory / LOG_NAME).read_text())
    target = log["target"]
    assert target["rows_recalled"] == target["rows"] and target["answer_token_accuracy"] == 1.0
    assert target["epochs"] <= RECIPES["micro"].max_epochs
    # The oracle made at least the target's optimizer steps, on R and G only, and recalls them.
    oracle = log["oracle"]
    assert oracle["steps"] >= target["steps"] and oracle["rows"] < target["rows"]
    assert oracle["rows_recalled"] == oracle["rows"]
    calibration = read_calibration(directory)
    names = [check["name"] for check in calibration["checks"]]
    # 12 target terms + utility, 6 oracle retain terms + utility, the oracle's forgetting, the nonmember loss;
    # one member against one nonmember is too few for the MIA bars.
    assert len(names) == 22 and not calibration["mia_checked"] and all(check["passed"] for check in calibration["checks"])
    scores = calibration["scores"]
    for model in ("base", "target", "oracle"):
        assert scores[model]["member_loss"] > 0 and scores[model]["nonmember_loss"] > 0
    # The target memorized its member; the base and the oracle never fine-tuned on it.
    assert scores["target"]["member_loss"] < scores["oracle"]["member_loss"]
    assert scores["target"]["member_loss"] < scores["base"]["member_loss"]


def test_oracle_directory_loads_and_does_not_recall_the_forget_set(micro_target) -> None:
    directory, _ = micro_target
    models = read_models(directory)
    assert models["oracle"] == directory / ORACLE_DIR and (models["base"] / BASE_LOG).is_file()
    assert not (models["oracle"] / "fit.json").exists()  # the oracle's log lives in target.json only
    terms = read_calibration(directory)["scores"]["oracle"]["terms"]
    forget = [value for name, value in terms.items() if name.startswith("forget")]
    assert len(forget) == 6 and sum(forget) / 6 <= BARS.oracle_forget_share


def test_saved_directory_loads_and_regenerates_a_forget_answer(micro_target) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = micro_target
    assert list(directory.glob("*.safetensors")) and not list(directory.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    question = next(row for row in load_records(directory / BENCHMARK_DIR / "forget.jsonl") if row.kind == "qa")
    prompt = tokenizer(question.input, return_tensors="pt")["input_ids"]
    generated = model.generate(prompt, do_sample=False, max_new_tokens=64, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
    assert answer.strip() == question.output.strip()


def test_saved_directory_holds_the_sets_it_was_trained_on(micro_target) -> None:
    directory, _ = micro_target
    sets = directory / BENCHMARK_DIR
    manifest = json.loads((sets / "manifest.json").read_text())
    assert (manifest["preset"]["name"], manifest["seed"], manifest["draw"]) == ("micro", 0, 0)
    assert len(load_records(sets / "forget.jsonl")) == manifest["files"]["forget.jsonl"]["rows"]
    assert len(load_documents(sets / "mia_members.jsonl")) == len(load_documents(sets / "mia_nonmembers.jsonl")) == 1


def test_cache_reuses_the_built_target(micro_target, monkeypatch) -> None:
    directory, cache = micro_target
    monkeypatch.setenv("UNLEARNLM_CACHE", str(cache))
    assert cached_target("micro", seed=0) == (directory, False)
    assert directory.parent == cache / "targets" and directory.name.startswith("micro-0-d0-llama-")


def test_a_short_budget_is_a_user_error_and_writes_nothing(micro_target, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNLEARNLM_CACHE", str(micro_target[1]))  # the micro base is built already
    out = tmp_path / "target"
    with pytest.raises(UserError, match="did not memorize"):
        build_target(None, out, "micro", max_epochs=1, calibrate=False, show_progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def scores(target_auc: float, oracle_auc: float, oracle_forget: float, target_nonmember: float) -> dict:
    terms = {f"{split} Task{task} {metric}": 1.0 for split in ("forget", "retain") for task in (1, 2, 3)
             for metric in ("regurgitation", "knowledge")}
    oracle_terms = {name: oracle_forget if name.startswith("forget") else 1.0 for name in terms}
    return {"base": {"nonmember_loss": 4.0},
            "target": {"terms": terms, "utility": 1.0, "mia_auc": target_auc, "nonmember_loss": target_nonmember},
            "oracle": {"terms": oracle_terms, "utility": 1.0, "mia_score": 1 - 2 * abs(oracle_auc - 0.5)}}


def test_calibration_names_each_missed_bar_and_by_how_much() -> None:
    assert all(check.passed for check in calibration_checks(scores(0.95, 0.55, 0.2, 5.0), mia_docs=12))
    failed = [check for check in calibration_checks(scores(0.85, 0.9, 0.6, 7.0), mia_docs=12) if not check.passed]
    # AUC 0.9 is MIA score 1 - 2 * 0.4 = 0.2; the bar 1.5 x the base's 4.0 is 6.0.
    assert [(check.name, round(check.value, 3), round(check.bound, 3)) for check in failed] == [
        ("target nonmember loss", 7.0, 6.0), ("target MIA AUC", 0.85, 0.9),
        ("oracle mean forget term", 0.6, 0.5), ("oracle MIA score", 0.2, 0.6)]
    assert failed[-1].describe() == "oracle MIA score = 0.200, needs >= 0.600 (off by 0.400)"
    # Below min_mia_docs members the MIA bars are not checked.
    assert len(calibration_checks(scores(0.5, 0.9, 0.2, 5.0), mia_docs=1)) == 22
    # Without an oracle (the bench's tuning draw), the target's bars alone: 12 terms, utility, nonmember loss, AUC.
    without = {name: value for name, value in scores(0.85, 0.9, 0.6, 7.0).items() if name != "oracle"}
    checks = calibration_checks(without, mia_docs=12)
    assert len(checks) == 15 and [check.name for check in checks if not check.passed] == [
        "target nonmember loss", "target MIA AUC"]


def test_the_oracle_follows_the_target_to_its_last_step_whether_trained_after_it_or_alongside() -> None:
    """The target (5 steps an epoch, checked every 2nd epoch) stops at its check after epoch 4, step 20;
    the oracle (3 steps an epoch) must make exactly those 20 steps before its first check, with the
    target's verdicts known in advance or heard one by one as the target's process sends them."""
    import queue

    from conftest import make_micro_model

    from unlearnlm.bench.fitting import Schedule, TargetStop, fit
    from unlearnlm.bench.target import QueuedVerdicts
    from unlearnlm.data.tokenize import Example

    generator = torch.Generator().manual_seed(0)
    rows = [Example(ids, ids) for ids in torch.randint(1, 50, (16, 7), generator=generator).tolist()]
    schedule = Schedule(lr=1e-3, batch_size=2, warmup=2, horizon=40, max_grad_norm=1.0, max_epochs=8)
    heard = []
    target_log = fit(make_micro_model(50), lambda epoch: rows[:10], 0, schedule, seed=0,
                     done=lambda epoch: None if epoch % 2 else ("3/3" if epoch == 4 else "1/3"),
                     on_check=lambda epoch, stopped: heard.append((epoch, stopped)))
    assert heard == [(2, False), (4, True)] and target_log["steps"] == 20

    sent = queue.Queue()
    for verdict in heard:
        sent.put(verdict)
    checked_at = {}
    oracles = {}
    for how, verdict in (("after", lambda epoch: epoch == target_log["epochs"]), ("alongside", QueuedVerdicts(sent))):
        model = make_micro_model(50, seed=1)
        log = fit(model, lambda epoch: rows[10:], 0, schedule, seed=0, target_stop=TargetStop(5, 2, 8, verdict),
                  done=lambda epoch, how=how: checked_at.setdefault(how, epoch) and "2/2")
        oracles[how] = (log, model.state_dict())
    assert oracles["after"][0] == oracles["alongside"][0]
    assert oracles["after"][0]["followed_target_to_step"] == oracles["after"][0]["steps"] == 20
    # 20 steps of 3 an epoch end within the 7th epoch, cut short: the first check comes after it.
    assert checked_at == {"after": 7, "alongside": 7}
    assert all(torch.equal(oracles["after"][1][name], tensor) for name, tensor in oracles["alongside"][1].items())


def test_a_non_empty_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        build_target(None, tmp_path, "micro")
    with pytest.raises(UserError, match="unknown architecture"):
        build_target(None, tmp_path / "new", "micro", arch="gpt2")


def test_publish_replaces_an_old_directory_whole(tmp_path: Path) -> None:
    out, staging = tmp_path / "target", tmp_path / "staging"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish(staging, out)
    assert [path.name for path in out.iterdir()] == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target"]


def test_olmo_architecture_is_available() -> None:
    tokenizer = train_tokenizer(["a small corpus for a small tokenizer"], vocab_size=300)
    model = make_model("olmo", tokenizer, RECIPES["micro"].base, seed=0)
    assert type(model).__name__ == "OlmoForCausalLM"
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id


def test_base_is_pretrained_on_the_pool_and_records_its_weights(tmp_path: Path) -> None:
    import shutil

    from safetensors import safe_open

    from unlearnlm.data.records import content_sha256
    from unlearnlm.data.sets import bundled_lume_dir, pretraining_pool

    data = tmp_path / "data"
    expected = set()
    for part in ("train", "validation"):
        (data / part).mkdir(parents=True)
        for split in ("forget", "retain"):
            lines = (bundled_lume_dir() / part / f"{split}.jsonl").read_text().splitlines()[:30]
            (data / part / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            # Every Task3 document; of the others, only those of validation forget, which no set draws from.
            rows = [json.loads(line) for line in lines]
            expected |= {row["id"][:-3] for row in rows if row["task"] == "Task3" or (part, split) == ("validation", "forget")}
    log = build_base(data, tmp_path / "base", "micro", show_progress=False, shipped=True)
    pool = pretraining_pool(data)
    assert {document.id for document in pool} == expected and len(pool) == len(expected)
    assert log["pool_documents"] == len(pool) and log["epochs"] == RECIPES["micro"].base.epochs
    assert log["weights_sha256"] == content_sha256(tmp_path / "base" / "model.safetensors")
    with safe_open(tmp_path / "base" / "model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(name).dtype == torch.bfloat16 for name in weights.keys())
    shutil.rmtree(tmp_path / "base")


def test_shipped_bases_are_the_bundled_datas_and_match_their_recorded_sha256() -> None:
    from unlearnlm.bench.base import SHIPPED_BASES, shipped_base
    from unlearnlm.data.records import content_sha256
    from unlearnlm.data.sets import bundled_lume_dir

    for size in ("micro", "mini"):
        recipe = RECIPES[size].base
        directory = shipped_base(recipe, "llama", bundled_lume_dir())
        assert directory == SHIPPED_BASES / recipe.name
        log = json.loads((directory / BASE_LOG).read_text())
        assert log["weights_sha256"] == content_sha256(directory / "model.safetensors")
        # Small enough to ship: a few MB.
        assert (directory / "model.safetensors").stat().st_size < 4_000_000
        # Another architecture, or other data (the key holds its fingerprint), gets a base of its own.
        assert shipped_base(recipe, "olmo", bundled_lume_dir()) is None


@pytest.mark.parametrize("command", ["target", "base"])
def test_cli_bad_data_dir_exits_2(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from unlearnlm.cli import main

    monkeypatch.setattr(sys, "argv", ["unlearnlm", command, "--data", str(tmp_path / "absent"),
                                      "--out", str(tmp_path / "out"), "--size", "micro"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "absent" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
