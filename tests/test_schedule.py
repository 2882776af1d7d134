import math

import pytest

from unlearnlm.data.schedule import FORGET, RETAIN, CyclicSampler, chunk_schedule, interleave, split_chunks


def test_chunks_are_disjoint_ordered_and_cover_with_a_remainder():
    chunks = split_chunks(10, 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_chunks(3, None) == [[0, 1, 2]]
    assert split_chunks(0, 4) == []


def test_cyclic_sampler_wraps_and_uses_every_row_before_repeating():
    sampler = CyclicSampler(5)
    assert sampler.take(3) == [0, 1, 2]
    assert sampler.take(4) == [3, 4, 0, 1]
    assert sampler.take(5) == [2, 3, 4, 0, 1]


def test_interleave_one_forget_then_ratio_retain():
    items = interleave([0, 1], [10, 11, 12, 13], 2)
    assert [(i.role, i.index) for i in items] == [
        (FORGET, 0), (RETAIN, 10), (RETAIN, 11), (FORGET, 1), (RETAIN, 12), (RETAIN, 13)]


def test_schedule_pairs_each_chunk_with_chunk_size_times_ratio_cyclic_retain():
    phases = chunk_schedule(n_forget=5, n_retain=7, chunk_size=2, ratio=3, epochs=4)
    assert [p.epochs for p in phases] == [4, 4, 4]
    forget = [[i.index for i in p.items if i.role == FORGET] for p in phases]
    retain = [[i.index for i in p.items if i.role == RETAIN] for p in phases]
    assert forget == [[0, 1], [2, 3], [4]]
    # 6, 6 and 3 retain rows, the running index wrapping around the 7 retain rows.
    assert retain == [[0, 1, 2, 3, 4, 5], [6, 0, 1, 2, 3, 4], [5, 6, 0]]
    assert [i.role for i in phases[2].items] == [FORGET, RETAIN, RETAIN, RETAIN]


def test_ratio_zero_is_forget_only():
    phases = chunk_schedule(4, 10, None, 0, 1)
    assert len(phases) == 1 and all(i.role == FORGET for i in phases[0].items)


def _agad_phases(overrides, n_forget=5, n_retain=8, seed=7):
    from unlearnlm.config import load_config
    from unlearnlm.methods import get_method

    config = load_config(None, ["method=agad", "schedule.chunk_size=2", "schedule.epochs_per_chunk=2",
                                "optim.lr=1e-3", "optim.batch_size=2", *overrides])
    method = get_method("agad")
    return method.schedule(n_forget, n_retain, config, method.build_settings(config.method_args), seed)


def test_agad_phase_order_matches_the_authors_on_three_chunks():
    """Read off methods/alternating.py (iraklis07/llm-unlearning) by hand: 5 forget rows in chunks of 2
    are 2 full chunks and a remainder; each full chunk is followed by an anneal on int(8 x 0.35) = 2
    retain rows, the remainder by nothing, then the final anneal over all 8 retain rows."""
    import random

    phases = _agad_phases(["method_args.anneal_fraction=0.35", "method_args.anneal_epochs=4",
                           "method_args.anneal_lr=5e-4", "method_args.anneal_batch_size=3"])
    assert [p.name for p in phases] == ["forget chunk 1", "anneal after chunk 1", "forget chunk 2",
                                        "anneal after chunk 2", "forget chunk 3", "final anneal"]
    assert [[(i.role, i.index) for i in p.items] for p in phases[0::2]] == [
        [(FORGET, 0), (FORGET, 1)], [(FORGET, 2), (FORGET, 3)], [(FORGET, 4)]]
    forget, anneal = phases[0], phases[1]
    assert (forget.epochs, forget.lr, forget.batch_size, forget.shuffle) == (2, None, None, True)
    assert (anneal.epochs, anneal.lr, anneal.batch_size, anneal.shuffle) == (4, 5e-4, 3, True)
    # The authors draw with Python's global generator right after a new Trainer re-seeded it.
    random.seed(7)
    expected = random.sample(range(8), 2)
    assert [i.index for i in phases[1].items] == [i.index for i in phases[3].items] == expected
    assert all(i.role == RETAIN for i in phases[1].items)
    assert [i.index for i in phases[5].items] == list(range(8))


def test_agad_anneal_every_second_chunk_and_without_final_anneal():
    phases = _agad_phases(["method_args.anneal_every=2", "method_args.final_anneal=false"], n_forget=7)
    assert [p.name for p in phases] == ["forget chunk 1", "forget chunk 2", "anneal after chunk 2",
                                        "forget chunk 3", "forget chunk 4"]


def test_agad_loss_is_the_token_mean_negated_on_forget():
    import torch

    from unlearnlm.data.tokenize import IGNORE_INDEX
    from unlearnlm.methods import get_method

    method = get_method("agad")
    # Row 0: one answer token at uniform logits over 4 tokens, cost log 4. Row 1: three answer tokens
    # with logit log 3 against three zeros, probability 3/6, cost log 2 each. Token mean: (log 4 +
    # 3 log 2) / 4 = 5/4 log 2 (the per-example mean would be 3/2 log 2).
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1], [IGNORE_INDEX, 2, 3, 1]])
    for position, token in enumerate((2, 3, 1)):
        logits[1, position, token] = math.log(3)
    settings = method.build_settings({})
    for is_forget, sign in ((True, -1.0), (False, 1.0)):
        batch = {"labels": labels, "is_forget": torch.tensor([is_forget, is_forget])}
        loss, _ = method.loss(logits, batch, settings)
        assert loss.item() == pytest.approx(sign * 1.25 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("override, key", [
    ("method_args.anneal_epochs=0", "anneal_epochs"), ("method_args.anneal_fraction=0", "anneal_fraction"),
    ("method_args.anneal_fraction=1.5", "anneal_fraction"), ("method_args.anneal_batch_size=0", "anneal_batch_size"),
    ("method_args.anneal_every=-1", "anneal_every"), ("method_args.anneal_lr=0", "anneal_lr"),
])
def test_agad_settings_out_of_range_name_the_key(override, key):
    from unlearnlm.errors import UserError

    with pytest.raises(UserError, match=f"method_args.{key}"):
        _agad_phases([override])
