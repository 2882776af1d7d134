"""Membership inference: each attack on statistics whose right AUC is known, and the batched loss."""

from __future__ import annotations

import json
import math
import random
import string

import numpy as np
import pytest
import torch
from conftest import make_micro_model

from unlearnlm.errors import UserError
from unlearnlm.evaluation.inputs import load_mia_documents
from unlearnlm.evaluation.likelihood import StatsBuffer, TokenStats
from unlearnlm.evaluation.mia import (
    attack_report,
    attack_scores,
    document_statistics,
    min_k_plus_plus_score,
    min_k_score,
    run_mia,
)


def pair_counting_auc(member_scores, nonmember_scores) -> float:
    """AUC as a probability: P(a member's score ranks above a nonmember's), a tie counting 1/2."""
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in member_scores for n in nonmember_scores)
    return wins / (len(member_scores) * len(nonmember_scores))


def official_mia_score(auc: float) -> float:
    """docs/scoring.md: MIA score = 1 - 2 * |AUC - 0.5|."""
    return 1 - 2 * abs(auc - 0.5)


def stats(*logprobs: float, mu: float | None = None, sigma: float | None = None) -> TokenStats:
    values = np.array(logprobs)
    if mu is None:
        return TokenStats(values)
    return TokenStats(values, np.full_like(values, mu), np.full_like(values, sigma))


def report(members: list[TokenStats], nonmembers: list[TokenStats], member_texts=None, nonmember_texts=None) -> dict:
    member_texts = member_texts or ["member text"] * len(members)
    nonmember_texts = nonmember_texts or ["member text"] * len(nonmembers)
    return attack_report(attack_scores(members, member_texts), attack_scores(nonmembers, nonmember_texts))


def test_loss_attack_auc():
    # Mean losses: members 0.1, 0.2; nonmembers 1.0, 2.0. Every member has the lower loss (higher
    # score -loss): 4 of 4 pairs, AUC 1, score 1 - 2|1 - 0.5| = 0.
    members = [stats(-0.1, -0.1), stats(-0.2, -0.2)]
    nonmembers = [stats(-1.0, -1.0), stats(-2.0, -2.0)]
    assert report(members, nonmembers)["loss"] == {"auc": 1.0, "score": 0.0}
    # Swapped: 0 of 4 pairs, AUC 0, and the score is 0 as well.
    assert report(nonmembers, members)["loss"] == {"auc": 0.0, "score": 0.0}


def test_loss_attack_auc_counts_ties_as_half():
    # Mean losses: members 1, 2, 3; nonmembers 2, 4. Member wins (lower loss): 1<2 1, 1<4 1, 2=2 1/2,
    # 2<4 1, 3>2 0, 3<4 1 -> 4.5 of 6 pairs: AUC 3/4, score 1 - 2 * 1/4 = 1/2.
    members = [stats(-1.0, -1.0), stats(-2.0, -2.0), stats(-3.0, -3.0)]
    nonmembers = [stats(-2.0, -2.0), stats(-4.0, -4.0)]
    result = report(members, nonmembers)["loss"]
    assert result["auc"] == pytest.approx(0.75)
    assert result["score"] == pytest.approx(0.5)
    # Reversed roles: 1.5 of 6 pairs, AUC 1/4, score 1 - 2 * 1/4 = 1/2 again.
    result = report(nonmembers, members)["loss"]
    assert result["auc"] == pytest.approx(0.25)
    assert result["score"] == pytest.approx(0.5)


def test_min_k_sees_rare_tokens_that_the_mean_loss_hides():
    # Same mean loss (1.0) on both sides; only the nonmembers have one very unlikely token.
    members = [stats(-1.0, -1.0, -1.0, -1.0, -1.0)] * 2
    nonmembers = [stats(-0.5, -0.5, -0.5, -0.5, -3.0)] * 2
    result = report(members, nonmembers)
    assert result["loss"]["auc"] == 0.5
    assert result["min_k"]["auc"] == 1.0
    assert min_k_score(nonmembers[0], k=0.2) == -3.0  # 20% of 5 tokens: the single lowest
    assert min_k_score(nonmembers[0], k=0.4) == pytest.approx(-1.75)


def test_zlib_divides_by_compressed_length():
    rng = random.Random(0)
    incompressible = ["".join(rng.choices(string.ascii_letters, k=200)) for _ in range(2)]
    compressible = ["a" * 200, "b" * 200]
    same_loss = [stats(-1.0, -1.0)] * 2
    result = report(same_loss, same_loss, incompressible, compressible)
    # -loss / zlib length is higher (closer to 0) for the long compressed texts.
    assert result["loss"]["auc"] == 0.5
    assert result["zlib"]["auc"] == 1.0


def test_min_k_plus_plus_statistics_from_logits():
    # Next-token probabilities (1/4, 1/2, 1/4): mu = 1.5 ln(1/2), sigma = 0.5 ln 2, so the likely
    # token standardizes to +1 and an unlikely one to -1.
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]))
    buffer = StatsBuffer([2, 2, 2], with_distribution=True)  # three examples, each a slice of one array
    result = buffer.fill(0, logits, torch.tensor([1, 0]))
    assert result.mu == pytest.approx([1.5 * math.log(0.5)] * 2, abs=1e-6)
    assert result.sigma == pytest.approx([0.5 * math.log(2)] * 2, abs=1e-6)
    assert (result.logprobs - result.mu) / result.sigma == pytest.approx([1.0, -1.0], abs=1e-5)
    member = buffer.fill(1, logits, torch.tensor([1, 1]))
    nonmember = buffer.fill(2, logits, torch.tensor([0, 0]))
    assert min_k_plus_plus_score(member) == pytest.approx(1.0, abs=1e-5)
    assert min_k_plus_plus_score(nonmember) == pytest.approx(-1.0, abs=1e-5)
    assert report([member] * 2, [nonmember] * 2)["min_k_plus_plus"]["auc"] == 1.0


def test_min_k_plus_plus_separates_when_raw_probabilities_do_not():
    # Equal log-probabilities, but the members' tokens are the likely ones of a sharper distribution.
    members = [stats(-1.0, -1.0, mu=-2.0, sigma=0.5)] * 2
    nonmembers = [stats(-1.0, -1.0, mu=-0.5, sigma=0.5)] * 2
    result = report(members, nonmembers)
    assert result["min_k"]["auc"] == 0.5
    assert result["min_k_plus_plus"]["auc"] == 1.0


def test_k_must_be_a_fraction():
    with pytest.raises(ValueError):
        min_k_score(stats(-1.0), k=0.0)


def test_batched_document_loss_equals_the_official_per_document_loss(micro_tokenizer, lume_rows):
    model = make_micro_model(len(micro_tokenizer)).eval()
    documents = [row["input"][:length] for row, length in zip(lume_rows["forget"], (40, 300, 90, 160, 20))]
    batched = document_statistics(model, micro_tokenizer, documents, batch_size=3)
    for document, result in zip(documents, batched):
        ids = torch.tensor([micro_tokenizer(document)["input_ids"]])
        with torch.no_grad():
            official = model(ids, labels=ids).loss.item()
        assert result.mean_loss == pytest.approx(official, abs=1e-5)
        assert len(result.logprobs) == ids.shape[1] - 1


def test_a_long_documents_first_window_is_scored_as_the_official_loss(micro_tokenizer, lume_rows):
    """Past the context the document goes on in windows (tests/test_windows.py); its first window's
    tokens are those of ``model(ids, labels=ids)`` on the first 16 tokens."""
    model = make_micro_model(len(micro_tokenizer)).eval()
    model.config.max_position_embeddings = 16
    document = lume_rows["forget"][0]["input"]
    ids = torch.tensor([micro_tokenizer(document)["input_ids"][:16]])
    with torch.no_grad():
        official = model(ids, labels=ids).loss.item()
    stats = document_statistics(model, micro_tokenizer, [document])[0]
    assert len(stats.logprobs) == len(micro_tokenizer(document)["input_ids"]) - 1
    assert -stats.logprobs[:15].mean() == pytest.approx(official, abs=1e-5)


def test_run_mia_reports_every_attack(micro_tokenizer, lume_rows):
    model = make_micro_model(len(micro_tokenizer))
    texts = [row["input"][:120] for row in lume_rows["retain"][:6]]
    result = run_mia(model, micro_tokenizer, texts[:3], texts[3:], batch_size=2)
    assert set(result["attacks"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    # The official attack: score -loss, members labelled 1; the AUC by counting the 3 x 3 pairs.
    expected_auc = pair_counting_auc([-loss for loss in result["member_losses"]],
                                     [-loss for loss in result["nonmember_losses"]])
    assert result["attacks"]["loss"]["auc"] == pytest.approx(expected_auc, abs=1e-12)
    for attack in result["attacks"].values():
        assert 0 <= attack["auc"] <= 1
        assert attack["score"] == pytest.approx(official_mia_score(attack["auc"]), abs=1e-12)
    quick = run_mia(model, micro_tokenizer, texts[:3], texts[3:], batch_size=2, suite=False)
    assert set(quick["attacks"]) == {"loss"}
    assert quick["member_losses"] == pytest.approx(result["member_losses"], abs=1e-6)


def test_mia_documents_from_document_files_and_from_rows(tmp_path):
    documents = tmp_path / "members.jsonl"
    documents.write_text(json.dumps({"document": "Full text one."}) + "\n")
    assert load_mia_documents(documents) == ["Full text one."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "7sc1", "input": "Ada Lovelace was", "output": "a mathematician.", "task": "Task3"},
        {"id": "7qa0", "input": "Who?", "output": "Ada.", "task": "Task3"},
    ]))
    assert load_mia_documents(rows) == ["Ada Lovelace was a mathematician."]
    with pytest.raises(UserError):
        load_mia_documents(tmp_path / "missing.jsonl")


def test_level_command_prints_the_mean_of_each_documents_mean_token_loss(micro_model_dir, tmp_path, capsys):
    import json

    import torch
    from conftest import run_cli

    from unlearnlm.model import load_model_and_tokenizer

    documents = ["Ada Lovelace wrote the first program for the Analytical Engine.", "Paris is the capital of France."]
    path = tmp_path / "unseen.jsonl"
    path.write_text("".join(json.dumps({"document": text}) + "\n" for text in documents))
    assert run_cli("level", "--model", micro_model_dir, "--documents", path) == 0
    printed = float(capsys.readouterr().out.strip())
    model, tokenizer = load_model_and_tokenizer(micro_model_dir)
    with torch.no_grad():  # transformers' own causal-LM loss: the mean over each document's shifted tokens
        losses = [model(input_ids=ids, labels=ids).loss.item()
                  for ids in (tokenizer(text, return_tensors="pt")["input_ids"] for text in documents)]
    assert printed == pytest.approx(sum(losses) / len(losses), abs=1e-4)  # printed with 4 decimals
