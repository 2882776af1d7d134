"""Membership inference on member (forget) and nonmember documents.

The official attack is the loss attack: each document's mean token cross-entropy with labels = the
input ids over the whole document (what ``model(ids, labels=ids).loss`` returns), score ``-loss``.
Three stronger, reference-free attacks are reported next to it, each as an AUC and as the
``1 - 2|AUC - 0.5|`` score; only the loss attack enters the official results.

- zlib: log-likelihood divided by the zlib-compressed length of the text (Carlini et al., 2021).
- Min-K% prob: mean log-probability of the k% least likely tokens (Shi et al., 2024).
- Min-K%++: the same over tokens standardized against the model's next-token distribution,
  ``(log p(x_t) - mu_t) / sigma_t`` (Zhang et al., 2024).

Every score is oriented so that higher means "member".
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from unlearnlm.data.tokenize import Example
from unlearnlm.data.windows import window_examples
from unlearnlm.errors import UserError
from unlearnlm.evaluation.likelihood import Progress, TokenCache, TokenStats, encode_texts, joined, token_statistics
from unlearnlm.evaluation.scoring import mia_score, roc_auc
from unlearnlm.model import model_context

DEFAULT_K = 0.2
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


def document_statistics(
    model,
    tokenizer,
    documents: Sequence[str],
    batch_size: int = 8,
    with_distribution: bool = True,
    progress: Progress | None = None,
    cache: TokenCache | None = None,
) -> list[TokenStats]:
    """Token statistics of each whole document (right-padded batches), labels = input ids.

    A document longer than the model's context is scored window by window (data/windows.py), each
    token once; its statistics are those of all its scored tokens, so its loss is their mean.
    """
    context = model_context(model)
    examples, counts = [], []
    for index, ids in enumerate(encode_texts(tokenizer, documents, cache)):
        if len(ids) < 2:
            raise UserError(f"MIA document {index + 1} has fewer than 2 tokens, so it has no loss")
        parts = window_examples(Example(ids, ids), context or len(ids))
        examples += parts
        counts.append(len(parts))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stats = token_statistics(model, examples, pad_id, batch_size, with_distribution, progress)
    starts = np.cumsum([0, *counts])
    return [joined(stats[start:end]) for start, end in zip(starts[:-1], starts[1:])]


def mean_document_loss(model, tokenizer, documents: Sequence[str], batch_size: int = 8) -> float:
    """The mean over documents of each one's mean loss per token: the number the loss attack compares.

    On text a model saw only in pretraining it is the level a forgotten document should return to
    (``method_args.forget_ceiling``; ``unlearnlm level``).
    """
    stats = document_statistics(model, tokenizer, documents, batch_size, with_distribution=False)
    return float(np.mean([item.mean_loss for item in stats]))


def _lowest_fraction(values: np.ndarray, k: float) -> np.ndarray:
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    count = max(1, int(len(values) * k))
    return np.sort(values)[:count]


def loss_score(stats: TokenStats) -> float:
    return -stats.mean_loss


def zlib_score(stats: TokenStats, text: str) -> float:
    return -stats.mean_loss / len(zlib.compress(text.encode("utf-8")))


def min_k_score(stats: TokenStats, k: float = DEFAULT_K) -> float:
    return float(_lowest_fraction(stats.logprobs, k).mean())


def min_k_plus_plus_score(stats: TokenStats, k: float = DEFAULT_K) -> float:
    if stats.mu is None or stats.sigma is None:
        raise ValueError("Min-K%++ needs token statistics computed with the next-token distribution")
    # A one-hot distribution has sigma 0; the floor keeps such tokens finite instead of dividing by zero.
    standardized = (stats.logprobs - stats.mu) / np.maximum(stats.sigma, 1e-12)
    return float(_lowest_fraction(standardized, k).mean())


def attack_scores(
    stats: Sequence[TokenStats], documents: Sequence[str], k: float = DEFAULT_K, suite: bool = True
) -> dict[str, list[float]]:
    """Each attack's score per document: the loss attack, and with ``suite`` the others
    (Min-K%++ only when the next-token distribution was kept)."""
    scores = {"loss": [loss_score(item) for item in stats]}
    if suite:
        scores["zlib"] = [zlib_score(item, text) for item, text in zip(stats, documents)]
        scores["min_k"] = [min_k_score(item, k) for item in stats]
        if all(item.mu is not None for item in stats):
            scores["min_k_plus_plus"] = [min_k_plus_plus_score(item, k) for item in stats]
    return scores


def attack_report(member_scores: dict[str, list[float]], nonmember_scores: dict[str, list[float]]) -> dict[str, dict]:
    """``{attack: {"auc", "score"}}`` for the attacks present on both sides."""
    report = {}
    for attack in ATTACKS:
        if attack in member_scores and attack in nonmember_scores:
            value = roc_auc(member_scores[attack], nonmember_scores[attack])
            report[attack] = {"auc": value, "score": mia_score(value)}
    return report


def run_mia(
    model,
    tokenizer,
    members: Sequence[str],
    nonmembers: Sequence[str],
    batch_size: int = 8,
    k: float = DEFAULT_K,
    suite: bool = True,
    progress: Progress | None = None,
    cache: TokenCache | None = None,
) -> dict:
    """Per-document losses (the official input) and, with ``suite``, every attack's AUC and score."""
    member_stats = document_statistics(model, tokenizer, members, batch_size, suite, progress, cache)
    nonmember_stats = document_statistics(model, tokenizer, nonmembers, batch_size, suite, progress, cache)
    report = attack_report(attack_scores(member_stats, members, k, suite), attack_scores(nonmember_stats, nonmembers, k, suite))
    return {
        "member_losses": [item.mean_loss for item in member_stats],
        "nonmember_losses": [item.mean_loss for item in nonmember_stats],
        "k": k,
        "attacks": report,
    }
