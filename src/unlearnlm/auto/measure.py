"""What the held-out check and the rate probe read from a model: document losses, answer losses and
greedy answers, on every process as the engine's validation does (each scores its share of the rows)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from unlearnlm.auto.check import REQUEST_GROUP
from unlearnlm.data.raw import Rows
from unlearnlm.data.records import Record
from unlearnlm.data.tokenize import Example, encode_example
from unlearnlm.evaluation.evaluator import EvalData, EvalSettings, generation_rows
from unlearnlm.evaluation.likelihood import TokenCache, token_statistics
from unlearnlm.evaluation.mia import document_statistics

# The retain rows the check generates answers for and scores the loss of: a seeded sample bounds the
# cost of a check on a large retain set (a proportion's standard error at 64 rows is at most 0.06).
RETAIN_SAMPLE = 64
RAW_KIND = "documents"


@dataclass
class CheckData:
    """Every text the check reads, tokenized once for the whole run."""

    forget_documents: list[str]  # all of F, whole
    forget_kinds: list[str]  # each forget document's kind: its SemEval task, or one kind for raw documents
    level_documents: list[str]  # the part of U that sets the level
    check_documents: list[str]  # the held-out part of U
    forget_rows: list[Record]  # F's answers, as the evaluation asks them
    retain_rows: list[Record]  # a sample of R's answers, as the evaluation asks them
    retain_terms: list[str]  # each of those rows' term: its task's regurgitation or knowledge
    retain_training: list[Record]  # the same rows as unlearning trains on them (for their loss)
    unseen_rows: list[Record]  # the held-out unseen documents, cut to leave answers as long as F's
    # F's own documents and rows come first in forget_documents and forget_rows, the earlier forget
    # sets' after them: the check judges F alone too, or a request's documents would pass among
    # earlier ones already forgotten.
    own_documents: int
    own_rows: int
    # Each forget document's rows among the rows unlearning trains (F's, then the earlier sets'): what a
    # settling pass trains to move that document (``settle.arrange``).
    document_rows: list[list[int]] = field(default_factory=list)
    cache: TokenCache = field(default_factory=TokenCache)

    @property
    def has_earlier(self) -> bool:
        return self.own_documents < len(self.forget_documents)

    @cached_property  # read by every check; the documents and kinds do not change during a run
    def groups(self) -> dict[str, list[int]]:
        """The forget documents judged alone as well as all together: a ledger request's own, among the
        earlier requests' (they could pass among documents forgotten before), and each kind when F mixes
        kinds (on the benchmark's second draw, F's AUC of 0.55 hid Task3's biographies at 0.74, the
        kind the SemEval attack reads, behind Task2's pushed past unseen text at 0.38)."""
        groups = {REQUEST_GROUP: list(range(self.own_documents))} if self.has_earlier else {}
        kinds = dict.fromkeys(self.forget_kinds)
        if len(kinds) > 1:
            # Named apart from the request's group whatever the rows call their task.
            groups.update({f"{kind} documents": [index for index, each in enumerate(self.forget_kinds) if each == kind]
                           for kind in kinds})
        return groups


def kinded_documents(rows: Rows, offset: int = 0) -> list[tuple[str, str, list[int]]]:
    """A set's documents as the loss attack reads them, each with its kind and its training rows
    (``rows.for_training()``, numbered from ``offset``): raw documents whole (one kind, one row each),
    SemEval's sentence completions (their task; the document's rows are the completion and its
    questions, sharing its id), or, when there are none, each row's prompt and answer joined."""
    records = rows.for_training()
    if rows.is_raw:
        return [(text, RAW_KIND, [offset + index]) for index, text in enumerate(rows.documents)]
    if not any(row.kind == "sc" for row in records):
        return [(row.input + " " + row.output, row.task, [offset + index]) for index, row in enumerate(records)]
    by_document: dict[str, list[int]] = {}
    for index, row in enumerate(records):
        by_document.setdefault(row.document_id, []).append(offset + index)
    return [(row.input + " " + row.output, row.task, by_document[row.document_id]) for row in records if row.kind == "sc"]


def whole_documents(rows: Rows) -> list[str]:
    return [text for text, _, _ in kinded_documents(rows)]


def check_data(forget: Rows, retain: Rows, level_documents: Sequence[str], check_documents: Sequence[str],
               seed: int, earlier: Sequence[Rows] = ()) -> CheckData:
    """What the check reads; ``earlier`` forget sets (unlearned before from this model) are checked with F."""
    own_rows = forget.for_evaluation()
    offsets = np.cumsum([0, *(len(rows.for_training()) for rows in (forget, *earlier))])
    own_documents, *earlier_documents = (kinded_documents(rows, int(offset)) for rows, offset in zip((forget, *earlier), offsets))
    forget_documents = own_documents + [document for documents in earlier_documents for document in documents]
    retain_eval, retain_train = retain.for_evaluation(), retain.for_training()
    picked = sorted(random.Random(f"unlearnlm-check:{seed}").sample(range(len(retain)), min(RETAIN_SAMPLE, len(retain))))
    per_row = len(retain_eval) // max(1, len(retain_train))  # a raw document gives one evaluation row per cut
    retain_rows = [retain_eval[index * per_row + cut] for index in picked for cut in range(per_row)]
    return CheckData([text for text, _, _ in forget_documents], [kind for _, kind, _ in forget_documents],
                     list(level_documents), list(check_documents),
                     own_rows + [row for rows in earlier for row in rows.for_evaluation()],
                     retain_rows, [row_term(row) for row in retain_rows], [retain_train[index] for index in picked],
                     unseen_rows(check_documents, own_rows), len(own_documents), len(own_rows),
                     [document_rows for _, _, document_rows in forget_documents])


def row_term(row: Record) -> str:
    """The SemEval score a row counts in: its task's regurgitation (sentence completion) or knowledge (question)."""
    return f"{row.task} {'regurgitation' if row.kind == 'sc' else 'knowledge'}"


def unseen_rows(documents: Sequence[str], forget_rows: Sequence[Record]) -> list[Record]:
    """Each held-out unseen document as a completion whose answer has as many words as F's median
    answer: how much a model reproduces of text it never learned, asked as F is asked."""
    length = max(1, int(np.median([len(row.output.split()) for row in forget_rows])))
    rows = []
    for index, text in enumerate(documents):
        words = text.split()
        cut = max(1, len(words) - length)
        rows.append(Record(id=f"unseen{index}sc1", input=" ".join(words[:cut]), output=" ".join(words[cut:]), task="unseen"))
    return rows


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def document_losses(model, tokenizer, documents: Sequence[str], cache: TokenCache, batch_size: int) -> list[float]:
    """Each document's mean loss per token, as the loss attack and ``unlearnlm level`` read it."""
    return [item.mean_loss for item in document_statistics(model, tokenizer, documents, batch_size, False, cache=cache)]


def answer_losses(model, tokenizer, rows: Sequence[Record], batch_size: int, max_length: int | None = None,
                  append_eos: bool = False) -> list[float]:
    """Each row's mean loss per answer token, as unlearning computes it."""
    examples: list[Example] = [encode_example(tokenizer, row.input, row.output, max_length, append_eos=append_eos)
                               for row in rows]
    return [item.mean_loss for item in token_statistics(model, examples, _pad_id(tokenizer), batch_size)]


def answer_scores(model, tokenizer, rows: Sequence[Record], cache: TokenCache, batch_size: int) -> list[float]:
    """Each row's score (ROUGE-L recall or exact match) of its greedy answer, generated up to the
    longest reference answer's length (a longer generation cannot raise a recall)."""
    if not rows:
        return []
    longest = max(len(ids) for ids in cache.encode(tokenizer, [row.output for row in rows], add_special_tokens=False))
    settings = EvalSettings(batch_size=batch_size, max_new_tokens=max(1, longest), mia_suite=False)
    scored = generation_rows(model, tokenizer, EvalData(list(rows), [], cache=cache), settings)
    return [row["score"] for row in scored]


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0
