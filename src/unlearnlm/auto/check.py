"""The held-out check of ``--config auto``, its stopping rule and the verdict.

After every chunk, two stages:

1. losses, cheap: the loss attack between every forget document (all of F, whole, as the SemEval MIA
   reads its members) and the held-out unseen documents, which set nothing, and the retain answers'
   loss, teacher-forced;
2. generations, only when stage 1 passes: how much of F's answers the model still regurgitates and
   how much of R's it keeps.

The check is met when the attack's AUC lies within its bound around 0.5 (over all the forget
documents, and over each group of them judged alone: a ledger request's own documents, each kind of
document), the retain loss within its tolerance, F's answers regurgitated no more than the model
completes unseen text it was never fine-tuned on (plus a margin), and R's answers kept, term by
term (``retain_kept``). An AUC near 0.5 can hide documents left
memorised behind others pushed past unseen text; stage 2 finds those, since a memorised document's
answers come back. A two-sample Kolmogorov-Smirnov test between the same losses is reported and not
judged: every forget document is held at one level, so their losses bunch more tightly than unseen
text's, which the test rejects (p 0.01 to 0.02 on the benchmark's three draws, with AUCs of 0.35 to
0.68) and no loss-threshold attack can use. The bounds follow from the sample sizes and the model's
own numbers before unlearning (``Bounds``); docs/methods.md says what they can and cannot show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import ks_2samp

# The AUC bound's half-width is at least this (the SemEval MIA score 1 - 2|AUC - 0.5| of 0.8) and
# otherwise two standard deviations of the AUC of two samples from one distribution.
MIN_AUC_HALF_WIDTH = 0.1
NULL_SPREAD = 2.0
REQUEST_GROUP = "this request"  # a ledger request's own documents, among the earlier requests' checked with them

def null_auc_sd(members: int, others: int) -> float:
    """Standard deviation of the AUC (the Mann-Whitney U over ``members x others``) when both samples
    come from one distribution: sqrt((n1 + n2 + 1) / (12 n1 n2)) (Hanley and McNeil 1982, no ties)."""
    return math.sqrt((members + others + 1) / (12 * members * others))


def auc_half_width(members: int, others: int) -> float:
    return max(MIN_AUC_HALF_WIDTH, NULL_SPREAD * null_auc_sd(members, others))


def loss_auc(forget_losses: Sequence[float], unseen_losses: Sequence[float]) -> float:
    """The loss attack's AUC: the probability that a forget document has a lower loss than an unseen one
    (ties count half), the ROC AUC of the score ``-loss`` with forget documents as members."""
    forget, unseen = np.asarray(forget_losses, float)[:, None], np.asarray(unseen_losses, float)[None, :]
    return float(((forget < unseen).sum() + 0.5 * (forget == unseen).sum()) / (forget.size * unseen.size))


@dataclass(frozen=True)
class Bounds:
    """What the held-out check compares against, fixed before any weight moves."""

    auc_low: float
    auc_high: float
    retain_loss: float  # the retain answers' loss may rise up to this
    regurgitated: float  # F's answers may be regurgitated up to this
    retain_kept: float  # of R's answers' score before unlearning, term by term (``retain_kept``)
    # Each group of forget documents judged alone (``CheckData.groups``): its AUC's half-width around
    # 0.5, wider than the whole set's by the group's fewer documents.
    group_half_widths: Mapping[str, float] = field(default_factory=dict)


def make_bounds(n_forget: int, n_check: int, retain_loss_before: float, level: float, unseen_regurgitated: float,
                retain_tolerance: float, regurgitation_margin: float, retain_kept: float,
                groups: Mapping[str, int] | None = None) -> Bounds:
    """The retain loss may rise by ``retain_tolerance`` of its distance to the level (a retain answer
    that moved that far towards unseen text is being forgotten too); F's answers may be regurgitated
    as much as the model completes the held-out unseen documents, plus ``regurgitation_margin``.
    ``groups``: the number of forget documents in each group judged alone."""
    half = auc_half_width(n_forget, n_check)
    return Bounds(0.5 - half, 0.5 + half, retain_loss_before + retain_tolerance * max(0.0, level - retain_loss_before),
                  min(1.0, unseen_regurgitated + regurgitation_margin), retain_kept,
                  {name: auc_half_width(size, n_check) for name, size in (groups or {}).items()})


def loss_figures(forget_losses: Sequence[float], unseen_losses: Sequence[float], retain_loss: float,
                 level: float) -> dict:
    """Stage 1's figures from the documents' mean losses per token."""
    auc = loss_auc(forget_losses, unseen_losses)
    test = ks_2samp(forget_losses, unseen_losses)
    return {"forget_loss": float(np.mean(forget_losses)), "unseen_loss": float(np.mean(unseen_losses)),
            "mia_auc": auc, "mia_score": 1 - 2 * abs(auc - 0.5), "ks_distance": float(test.statistic),
            "ks_p": float(test.pvalue), "retain_loss": float(retain_loss), "level": level}


def term_means(scores: Sequence[float], terms: Sequence[str]) -> dict[str, float]:
    """The mean score of each term's rows."""
    return {term: float(np.mean([score for score, each in zip(scores, terms) if each == term])) for term in dict.fromkeys(terms)}


def retain_kept(after: Mapping[str, float], before: Mapping[str, float]) -> float:
    """The share of R's score kept, read as the SemEval task aggregate reads R: each term (a task's
    regurgitation or knowledge) alone, as its score now over its score before (at most 1, so that a
    term that rose cannot hide one that fell), the terms combined by their harmonic mean, which one
    term near 0 pulls near 0. A plain mean over rows hid a ledger request that took one term of R's
    from 1.00 to 0.16 while another term, four times larger, recovered (kept 1.00)."""
    ratios = [min(1.0, after[term] / before[term]) for term in before if before[term] > 0]
    return float(len(ratios) / sum(math.inf if ratio == 0 else 1 / ratio for ratio in ratios)) if ratios else 1.0


def answer_figures(forget_scores: Sequence[float], retain_scores: Sequence[float], retain_terms: Sequence[str],
                   retain_before: Mapping[str, float]) -> dict:
    """Stage 2's figures from the row scores (ROUGE-L recall, exact match) of F's and R's answers."""
    return {"forget_regurgitated": float(np.mean(forget_scores)),
            "retain_kept": retain_kept(term_means(retain_scores, retain_terms), retain_before)}


def group_aucs(forget_losses: Sequence[float], unseen_losses: Sequence[float], groups: Mapping[str, Sequence[int]]) -> dict:
    """The loss attack's AUC over each group of forget documents (indices into ``forget_losses``)."""
    return {name: loss_auc([forget_losses[index] for index in indices], unseen_losses) for name, indices in groups.items()}


def groups_outside(figures: Mapping, bounds: Bounds) -> dict[str, float]:
    """The groups whose AUC lies outside their bound: name -> AUC. A kind of document counts only when
    still seen (above its bound), a request's own documents on either side, as all of F does. U is text
    of one kind, and a kind of another reads as past it even after retraining without F: on the
    benchmark's three oracles, F's synthetic stories against U's biographies gave an AUC of 0.00, F's
    biographies 0.36 to 0.64."""
    return {name: auc for name, auc in figures.get("group_mia_auc", {}).items()
            if auc - 0.5 > bounds.group_half_widths[name]
            or (name == REQUEST_GROUP and 0.5 - auc > bounds.group_half_widths[name])}


def loss_stage_met(figures: Mapping, bounds: Bounds) -> bool:
    return (bounds.auc_low <= figures["mia_auc"] <= bounds.auc_high and figures["retain_loss"] <= bounds.retain_loss
            and not groups_outside(figures, bounds))


def met(figures: Mapping, bounds: Bounds) -> bool:
    """The stopping rule: F (with the earlier forget sets, and each group alone) cannot be told from
    held-out unseen text, and R is kept."""
    return (loss_stage_met(figures, bounds) and "forget_regurgitated" in figures
            and max(figures["forget_regurgitated"], figures.get("request_regurgitated", 0.0)) <= bounds.regurgitated
            and figures["retain_kept"] >= bounds.retain_kept)


def rank(figures: Mapping, bounds: Bounds) -> tuple:
    """The order of states for keeping the best: met first, then retain within its tolerance (its loss,
    and its answers where stage 2 read them), then the loss stage passed, then fewer groups of forget
    documents outside their bounds, then the attack nearer chance, then the losses' distributions nearer."""
    retain_ok = figures["retain_loss"] <= bounds.retain_loss and figures.get("retain_kept", 1.0) >= bounds.retain_kept
    return (met(figures, bounds), retain_ok, loss_stage_met(figures, bounds), -len(groups_outside(figures, bounds)),
            round(figures["mia_score"], 6), figures["ks_p"])


def verdict(figures: Mapping, bounds: Bounds, extra: Mapping | None = None) -> dict:
    """``run.json``'s ``verdict``: whether the check was met on the state kept, its figures, the bounds
    they were read against, a sentence saying so and, when not met, what to try."""
    record = {"forgotten": met(figures, bounds), **rounded(figures), "bounds": rounded(asdict(bounds)), **(extra or {})}
    record["summary"] = summary(record)
    if not record["forgotten"]:
        record["advice"] = advice(figures, bounds)
    return record


def rounded(values: Mapping) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else rounded(value) if isinstance(value, Mapping) else value
            for key, value in values.items()}


def summary(record: Mapping) -> str:
    bounds = record["bounds"]
    half = (bounds["auc_high"] - bounds["auc_low"]) / 2
    text = (f"{'forgotten' if record['forgotten'] else 'not forgotten'}: forget documents at {record['forget_loss']:.2f} "
            f"nats/token against held-out unseen text at {record['unseen_loss']:.2f} (MIA AUC {record['mia_auc']:.2f}, "
            f"bound 0.5 ± {half:.2f}; Kolmogorov-Smirnov p {record['ks_p']:.2f}, reported)")
    if "forget_regurgitated" in record:
        text += (f"; forget answers regurgitated {record['forget_regurgitated']:.0%} (bound {bounds['regurgitated']:.0%}); "
                 f"retain answers kept {record['retain_kept']:.0%} (bound {bounds['retain_kept']:.0%})")
    if record.get("group_mia_auc"):
        text += "; alone: " + ", ".join(f"{name} MIA AUC {auc:.2f} ({group_bound(name, bounds['group_half_widths'][name])})"
                                        for name, auc in record["group_mia_auc"].items())
    if "request_regurgitated" in record:
        text += f"; {REQUEST_GROUP}'s answers regurgitated {record['request_regurgitated']:.0%}"
    return text


def group_bound(name: str, half_width: float) -> str:
    """A group's bound in words: either side for a request's own documents, the seen side for a kind."""
    return f"bound 0.5 ± {half_width:.2f}" if name == REQUEST_GROUP else f"bound at most {0.5 + half_width:.2f}"


def advice(figures: Mapping, bounds: Bounds) -> list[str]:
    """What to try, from which part of the check failed."""
    tips = []
    if (figures.get("forget_regurgitated", 0.0) > bounds.regurgitated
            and bounds.auc_low <= figures["mia_auc"] <= bounds.auc_high):
        tips.append("some forget documents are still recognised while others were pushed past unseen text: "
                    "smaller chunks (--set schedule.chunk_size=N) spread the ascent more evenly")
    outside = groups_outside(figures, bounds)
    if outside:
        tips.append("a group of the forget documents, judged alone, can be told from unseen text ("
                    + ", ".join(f"{name}: {'still seen' if auc > 0.5 else 'pushed past'}" for name, auc in outside.items())
                    + "): more settling passes (--set auto.settle_passes=N) hold each document at the level again")
    if figures["mia_auc"] > bounds.auc_high:
        tips.append("the forget documents still read as seen: more settling passes (--set auto.settle_passes=N), more "
                    "epochs per chunk (--set schedule.epochs_per_chunk=N) or more weights trained (full weights rather "
                    "than LoRA, more layers)")
    if figures["mia_auc"] < bounds.auc_low:
        tips.append("the forget documents were pushed past unseen text: more settling passes (--set auto.settle_passes=N), "
                    "which pull them back to the level, fewer epochs per chunk, or smaller chunks")
    if figures["retain_loss"] > bounds.retain_loss or figures.get("retain_kept", 1.0) < bounds.retain_kept:
        tips.append("the retain set was damaged: more retain rows per forget row (--set schedule.ratio=N) or a larger retain set")
    if figures.get("forget_regurgitated", 0.0) > bounds.regurgitated:
        tips.append("forget answers are still regurgitated: more epochs per chunk")
    if bounds.auc_high - bounds.auc_low > 2 * MIN_AUC_HALF_WIDTH + 1e-9:
        tips.append("the AUC bound is wide because U is small: more unseen documents make the check sharper")
    return tips
