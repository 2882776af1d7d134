import math

import pytest
import torch
from conftest import make_micro_model

from unlearnlm.data.tokenize import IGNORE_INDEX, collate, encode_example
from unlearnlm.methods import REGISTRY, get_method
from unlearnlm.methods.base import example_nll, forward
from unlearnlm.methods.kl import retain_kl


def hand_batch():
    """Two examples, vocabulary 3, answers on the last two positions; the second is a retain row."""
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]])
    logits = torch.zeros(2, 4, 3)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # p(1) = 3/5
    logits[0, 2] = torch.tensor([0.0, 0.0, math.log(2.0)])  # p(2) = 2/4
    # The second row's prompt logits are extreme; they must not matter.
    logits[1, 0] = torch.tensor([50.0, -50.0, 0.0])
    return logits, {"labels": labels, "is_forget": torch.tensor([True, False])}


def test_example_nll_is_the_mean_over_answer_tokens_only():
    logits, batch = hand_batch()
    nll = example_nll(logits, batch["labels"])
    assert nll[0].item() == pytest.approx(-(math.log(3 / 5) + math.log(2 / 4)) / 2, abs=1e-6)
    assert nll[1].item() == pytest.approx(math.log(3.0), abs=1e-6)  # uniform over 3 at the single answer token


@pytest.mark.parametrize("name, retain_weight", [("gd", 1.0), ("sugd", 0.5)])
def test_gradient_difference_signs_and_weights(name, retain_weight):
    logits, batch = hand_batch()
    method = get_method(name)
    loss, stats = method.loss(logits, batch, method.build_settings({}), None)
    forget_nll = -(math.log(3 / 5) + math.log(2 / 4)) / 2
    assert loss.item() == pytest.approx((-1.0 * forget_nll + retain_weight * math.log(3.0)) / 2, abs=1e-6)
    assert stats["forget_loss"] == pytest.approx(forget_nll, abs=1e-6)


@pytest.mark.parametrize("name", ["gd", "sugd"])
def test_forget_ceiling_stops_the_ascent_of_rows_above_it(name):
    forget_nll = -(math.log(3 / 5) + math.log(2 / 4)) / 2  # about 0.60 nats
    method = get_method(name)
    for ceiling, pushed in ((0.5, False), (1.0, True)):
        logits, batch = hand_batch()
        logits.requires_grad_(True)
        settings = method.build_settings({"forget_ceiling": ceiling, "retain_weight": 1.0})
        loss, stats = method.loss(logits, batch, settings, None)
        loss.backward()
        expected_forget = -min(forget_nll, ceiling)
        assert loss.item() == pytest.approx((expected_forget + math.log(3.0)) / 2, abs=1e-6)
        assert stats["forget_loss"] == pytest.approx(forget_nll, abs=1e-6)  # the log shows the real loss
        assert bool(logits.grad[0].abs().sum() > 0) is pushed
        assert logits.grad[1].abs().sum() > 0  # the retain row always trains


@pytest.mark.parametrize("name", ["gd", "sugd"])
def test_forget_target_pushes_rows_below_it_up_and_pulls_rows_above_it_down(name):
    forget_nll = -(math.log(3 / 5) + math.log(2 / 4)) / 2  # about 0.60 nats
    method = get_method(name)
    for target, sign in ((1.0, -1.0), (0.5, 1.0)):
        logits, batch = hand_batch()
        logits.requires_grad_(True)
        loss, _ = method.loss(logits, batch, method.build_settings({"forget_target": target, "retain_weight": 1.0}), None)
        assert loss.item() == pytest.approx((abs(forget_nll - target) + math.log(3.0)) / 2, abs=1e-6)
        loss.backward()
        # d loss / d logit of the first answer token's label: the NLL's own gradient (p - 1) / 2 tokens / 2 rows,
        # times +1 when the row is above the target (descent) and -1 below it (ascent).
        assert logits.grad[0, 1, 1].item() == pytest.approx(sign * (3 / 5 - 1) / 2 / 2, abs=1e-6)


def test_ga_ignores_retain_rows():
    logits, batch = hand_batch()
    method = get_method("ga")
    loss, _ = method.loss(logits, batch, method.build_settings({}), None)
    assert loss.item() == pytest.approx((math.log(3 / 5) + math.log(2 / 4)) / 2, abs=1e-6)


def test_npo_equals_two_over_beta_log_two_at_the_reference():
    logits, batch = hand_batch()
    method = get_method("npo")
    settings = method.build_settings({"beta": 0.1, "retain_weight": 0.0})
    reference = method.reference_view(logits, batch["labels"])
    loss, _ = method.loss(logits, batch, settings, reference)
    assert loss.item() == pytest.approx((2 / 0.1) * math.log(2) / 2, abs=1e-5)


def test_kl_is_zero_at_the_reference_and_ignores_prompt_positions():
    logits, batch = hand_batch()
    reference = get_method("kl").reference_view(logits, batch["labels"])
    shifted_prompt = logits.clone()
    shifted_prompt[:, 0] += torch.tensor([5.0, -5.0, 1.0])  # prompt position of both rows changes
    assert retain_kl(shifted_prompt, batch["labels"], reference).abs().max().item() < 1e-6
    moved = logits.clone()
    moved[1, 1] += torch.tensor([2.0, 0.0, 0.0])  # the retain row's answer position changes
    assert retain_kl(moved, batch["labels"], reference)[1].item() > 1e-3


def original_values(method, settings, model, batch):
    """What the engine supplies from the original model: the ``reference_view`` values, returned, and
    for a method that reads the original hidden states, ``batch["reference_hidden"]``."""
    layers = method.layers(settings, model.config.num_hidden_layers) if method.reference_hidden else ()
    with torch.no_grad():
        logits = forward(model, batch, layers, key="reference_hidden")
    return method.reference_view(logits, batch["labels"]) if method.reference_view else None


def model_logits(method, settings, model, batch):
    """The logits, with the hidden states the method declares put in ``batch``, as the engine does."""
    return forward(model, batch, method.layers(settings, model.config.num_hidden_layers))


def test_losses_ignore_padding(micro_tokenizer):
    """Padding a batch wider must not change any method's loss."""
    torch.manual_seed(0)
    model = make_micro_model(len(micro_tokenizer))
    examples = [encode_example(micro_tokenizer, "The cat sat", "on the mat.", append_eos=False),
                encode_example(micro_tokenizer, "A dog", "ran.", append_eos=False)]
    examples[1].meta["pad_extra"] = True
    narrow = collate(examples, micro_tokenizer.pad_token_id)
    wide = collate(examples + [encode_example(micro_tokenizer, "x " * 40, "y", append_eos=False)], micro_tokenizer.pad_token_id)
    for name, method in REGISTRY.items():
        settings = method.build_settings({})
        values = []
        for batch, rows in ((narrow, 2), (wide, 2)):
            inputs = {k: batch[k][:rows] for k in ("input_ids", "attention_mask", "labels")}
            inputs["is_forget"] = torch.tensor([True, False])
            reference = original_values(method, settings, model, inputs)
            with torch.no_grad():
                logits = model_logits(method, settings, model, inputs)
                values.append(method.loss(logits, inputs, settings, reference)[0].item())
        assert values[0] == pytest.approx(values[1], abs=1e-5), name


def memorize(model, inputs, labels, steps=40):
    """Unlearning starts from a model that knows its data, as the real targets do."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        example_nll(model(**inputs).logits, labels).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_one_step_moves_the_loss_in_the_intended_direction(name, micro_tokenizer):
    torch.manual_seed(0)
    model = make_micro_model(len(micro_tokenizer))
    method = get_method(name)
    settings = method.build_settings({})
    rows = [("Alice was born in", "Paris in 1901.", True), ("Bob lives in", "Rome.", False)]
    batch = collate([encode_example(micro_tokenizer, p, a, append_eos=False) for p, a, _ in rows], micro_tokenizer.pad_token_id)
    batch["is_forget"] = torch.tensor([f for _, _, f in rows])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    memorize(model, inputs, batch["labels"])
    reference = original_values(method, settings, model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def measure():
        logits = model_logits(method, settings, model, batch)
        return method.loss(logits, batch, settings, reference)[0], example_nll(logits, batch["labels"]).detach()

    loss_before, nll_before = measure()
    loss_before.backward()
    optimizer.step()
    with torch.no_grad():
        loss_after, nll_after = measure()
    assert loss_after.item() < loss_before.item()
    # Every method pushes the forget answer away.
    assert nll_after[0] > nll_before[0]


def test_token_logprobs_within_one_float32_step_of_the_largest_logit():
    """Peaked logits, as a model that memorized its rows gives: against float64, the error must stay
    within one float32 spacing at 20 (2**-19), the size of the log-normaliser's own rounding. The
    classes-in-dimension-1 layout of cross-entropy was 5 such steps off on the CPU."""
    from unlearnlm.methods.base import token_logprobs

    torch.manual_seed(0)
    labels = torch.randint(0, 1800, (2, 60))
    logits = torch.randn(2, 60, 1800) * 2
    logits.scatter_(-1, torch.roll(labels, -1, dims=1)[..., None], 20.0)
    logp, mask = token_logprobs(logits, labels)
    exact = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    assert mask.all()
    assert (logp.double() - exact).abs().max().item() <= 2.0 ** -19


def test_register_refuses_a_name_already_taken():
    from dataclasses import replace

    from unlearnlm.errors import UserError
    from unlearnlm.methods import register

    with pytest.raises(UserError, match="'gd' is already registered"):
        register(replace(get_method("gd"), summary="another gd"))
    assert REGISTRY["gd"].summary != "another gd"


def simnpo_by_hand(beta: float, delta: float) -> float:
    """The loss of ``hand_batch`` by the SimNPO authors' code, -(2/beta) log sigmoid(beta (nll - delta))
    with nll the length-normalised NLL, worked out by hand: the forget row's two answer tokens have
    p = 3/5 and 2/4, the retain row's one token p = 1/3 (retain NLL, weight 1)."""
    forget_nll = -(math.log(3 / 5) + math.log(2 / 4)) / 2
    log_sigmoid = -math.log1p(math.exp(-beta * (forget_nll - delta)))
    forget_term = -(2 / beta) * log_sigmoid
    return (forget_term + math.log(3.0)) / 2  # the batch mean of the two rows' terms


@pytest.mark.parametrize("beta, delta", [(2.5, 0.0), (2.5, 0.3), (0.5, 1.2)])
def test_the_authors_delta_is_a_margin_of_beta_times_delta(beta: float, delta: float) -> None:
    """Their delta as it is, and as gamma = beta x delta, give the loss of their formula."""
    logits, batch = hand_batch()
    method = get_method("simnpo")
    loss, _ = method.loss(logits, batch, method.build_settings({"beta": beta, "delta": delta}), None)
    assert loss.item() == pytest.approx(simnpo_by_hand(beta, delta), abs=1e-6)
    as_gamma, _ = method.loss(logits, batch, method.build_settings({"beta": beta, "gamma": beta * delta}), None)
    assert as_gamma.item() == pytest.approx(loss.item(), abs=1e-6)


def test_gamma_and_delta_together_are_refused() -> None:
    from unlearnlm.errors import UserError

    with pytest.raises(UserError, match="exclusive"):
        get_method("simnpo").build_settings({"gamma": 0.5, "delta": 0.2})
