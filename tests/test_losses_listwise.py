"""Plackett–Luce and LiPO-λ against plain per-sample loops of their papers' formulas (values and gradients), and
per-sample losses (`reduction="none"`) for every loss."""
import math

import pytest
import torch

from hscr_fast.losses import dpo_loss, lipo_lambda_loss, mlpo_loss, plackett_luce_loss


def plackett_luce_loop(policy, ref, valid, gamma):
    """DPO paper, Appendix A.3: −log Π_i exp(r_(i)) / Σ_{m≥i} exp(r_(m)) over the valid responses in column order."""
    per_sample = []
    for b in range(policy.shape[0]):
        kept = [i for i in range(policy.shape[1]) if valid[b, i]]
        rewards = [gamma * (policy[b, i].double() - ref[b, i].double()) for i in kept]
        loss = policy.new_zeros((), dtype=torch.float64)
        for place in range(len(rewards)):
            remaining = torch.stack([torch.exp(r) for r in rewards[place:]]).sum()
            loss = loss - torch.log(torch.exp(rewards[place]) / remaining)
        per_sample.append(loss)
    return torch.stack(per_sample)


def lipo_lambda_loop(policy, ref, valid, gamma, labels=None):
    """LiPO-λ (Liu et al. 2024, the Lambda weight of LambdaLoss): Σ over pairs with ψ_i > ψ_j of
    −|G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|·log σ(r_i − r_j), G = 2^ψ − 1, D(τ) = log2(1 + τ), τ from sorting by reward."""
    per_sample = []
    for b in range(policy.shape[0]):
        kept = [i for i in range(policy.shape[1]) if valid[b, i]]
        reward = {i: gamma * (policy[b, i].double() - ref[b, i].double()) for i in kept}
        if labels is None:  # rank order: best 1, worst 0, evenly spaced
            n = len(kept)
            psi = {i: (n - 1 - p) / (n - 1) if n > 1 else 0.0 for p, i in enumerate(kept)}
        else:
            psi = {i: float(labels[b, i]) for i in kept}
        by_reward = sorted(kept, key=lambda i: (-float(reward[i].detach()), i))
        tau = {i: by_reward.index(i) + 1 for i in kept}
        loss = policy.new_zeros((), dtype=torch.float64)
        for i in kept:
            for j in kept:
                if psi[i] > psi[j]:
                    gain_gap = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1))
                    discount_gap = abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                    loss = loss - gain_gap * discount_gap * torch.log(torch.sigmoid(reward[i] - reward[j]))
        per_sample.append(loss)
    return torch.stack(per_sample)


def ragged_case(batch, width, seed, dtype=torch.float64):
    """Random log-probs with a random valid mask per row: column 0 always, any subset of the rest (not only a
    prefix), the last row full, and in batches of 3 or more row 0 with y_w alone."""
    generator = torch.Generator().manual_seed(seed)
    policy = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 30
    ref = policy + torch.randn(batch, width, generator=generator, dtype=torch.float64) * 8
    valid = torch.rand(batch, width, generator=generator) < 0.7
    valid[:, 0] = True
    valid[-1] = True
    if batch >= 3:
        valid[0, 1:] = False
    return policy.to(dtype), ref.to(dtype), valid


CASES = [(batch, width, seed) for batch in (1, 3, 7) for width in (2, 3, 5) for seed in (0, 1)]
LOSSES = {"plackett-luce": (plackett_luce_loss, plackett_luce_loop),
          "lipo-lambda": (lipo_lambda_loss, lipo_lambda_loop)}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("batch,width,seed", CASES)
def test_values_and_gradients_match_the_papers_formula(name, batch, width, seed):
    loss_fn, loop = LOSSES[name]
    gamma = 0.37
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        policy, ref, valid = ragged_case(batch, width, seed, dtype)
        policy.requires_grad_(True)
        ref.requires_grad_(True)
        policy_loop = policy.detach().double().requires_grad_(True)
        ref_loop = ref.detach().double().requires_grad_(True)

        per_sample, _ = loss_fn(policy, ref, gamma=gamma, valid=valid, reduction="none")
        expected = loop(policy_loop, ref_loop, valid, gamma)
        assert per_sample.shape == (batch,) and per_sample.dtype == dtype
        torch.testing.assert_close(per_sample.double(), expected.detach(), rtol=tolerance, atol=tolerance)

        mean, _ = loss_fn(policy, ref, gamma=gamma, valid=valid)
        torch.testing.assert_close(mean.double(), expected.detach().mean(), rtol=tolerance, atol=tolerance)
        grads = torch.autograd.grad(mean, (policy, ref))
        expected_mean = expected.mean()
        if expected_mean.requires_grad:
            expected_grads = torch.autograd.grad(expected_mean, (policy_loop, ref_loop))
        else:  # no row has a pair: the loss is a constant 0
            expected_grads = (torch.zeros_like(policy_loop), torch.zeros_like(ref_loop))
        for ours, theirs in zip(grads, expected_grads):
            torch.testing.assert_close(ours.double(), theirs, rtol=tolerance, atol=tolerance)
            assert torch.all(ours[~valid] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lipo_lambda_with_given_labels_and_ties_matches_the_formula(seed):
    policy, ref, valid = ragged_case(6, 5, seed)
    generator = torch.Generator().manual_seed(100 + seed)
    # Labels from a small set, so some pairs tie (a tie is no pair), in an order unrelated to the columns'.
    labels = torch.randint(0, 3, (6, 5), generator=generator).double() / 2
    # Two responses with the same reward exercise the ranking's tie rule.
    ref[2, 3] = ref[2, 1] + (policy[2, 3] - policy[2, 1])
    policy.requires_grad_(True)
    loss, _ = lipo_lambda_loss(policy, ref, gamma=0.5, valid=valid, labels=labels, reduction="none")
    policy_loop = policy.detach().clone().requires_grad_(True)
    expected = lipo_lambda_loop(policy_loop, ref, valid, 0.5, labels=labels)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    (ours,) = torch.autograd.grad(loss.sum(), policy)
    (theirs,) = torch.autograd.grad(expected.sum(), policy_loop)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_lipo_lambda_weights_follow_the_current_reward_ranking():
    """A pair's weight depends on where the policy currently ranks the two responses: the same labelled pair counts
    more when the policy ranks it at the top (positions 1, 2) than at the bottom (positions 2, 3)."""
    labels = torch.tensor([[1.0, 0.0, 0.5]])
    # Rewards (γ = 1, ref = 0): pair (0, 1) is at positions 1 and 2 ...
    top, _ = lipo_lambda_loss(torch.tensor([[3.0, 2.0, 1.0]]), torch.zeros(1, 3), gamma=1.0, labels=labels,
                              reduction="none")
    # ... or at positions 2 and 3, its margin unchanged.
    bottom, _ = lipo_lambda_loss(torch.tensor([[3.0, 2.0, 4.0]]), torch.zeros(1, 3), gamma=1.0, labels=labels,
                                 reduction="none")
    # Hand-evaluated: gains 1, 0, √2−1; discounts 1/log2(2)=1, 1/log2(3), 1/log2(4)=1/2.
    d2, sig = 1 / math.log2(3), lambda x: math.log(1 / (1 + math.exp(-x)))
    expected_top = -(1 * (1 - d2) * sig(1.0) + (math.sqrt(2) - 1) * (d2 - 0.5) * sig(-1.0)
                     + (2 - math.sqrt(2)) * (1 - 0.5) * sig(2.0))
    expected_bottom = -(1 * (d2 - 0.5) * sig(1.0) + (math.sqrt(2) - 1) * (1 - 0.5) * sig(2.0)
                        + (2 - math.sqrt(2)) * (d2 - 1) * -1 * sig(-1.0))
    assert float(top) == pytest.approx(expected_top, rel=1e-6)
    assert float(bottom) == pytest.approx(expected_bottom, rel=1e-6)


def test_two_responses_reduce_to_dpo():
    """With one pair, Plackett–Luce is DPO exactly and LiPO-λ is DPO times the constant weight 1 − 1/log2(3)."""
    policy, ref, _ = ragged_case(9, 2, seed=4)
    dpo, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.2, reduction="none")
    plackett_luce, _ = plackett_luce_loss(policy, ref, gamma=0.2, reduction="none")
    lipo, _ = lipo_lambda_loss(policy, ref, gamma=0.2, reduction="none")
    torch.testing.assert_close(plackett_luce, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lipo, dpo * (1 - 1 / math.log2(3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_placeholders_in_missing_cells_never_leak(name):
    loss_fn, _ = LOSSES[name]
    policy, ref, valid = ragged_case(7, 5, seed=2, dtype=torch.float32)
    poisoned_policy, poisoned_ref = policy.clone(), ref.clone()
    poisoned_policy[~valid] = float("nan")
    poisoned_ref[~valid] = float("-inf")
    poisoned_policy.requires_grad_(True)
    loss, metrics = loss_fn(poisoned_policy, poisoned_ref, valid=valid)
    clean_loss, clean_metrics = loss_fn(policy, ref, valid=valid)
    torch.testing.assert_close(loss, clean_loss)
    loss.backward()
    assert torch.isfinite(poisoned_policy.grad).all()
    assert torch.all(poisoned_policy.grad[~valid] == 0)
    torch.testing.assert_close(metrics["margin_explicit"], clean_metrics["margin_explicit"])


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_policy_reference_and_weight(name):
    loss_fn, _ = LOSSES[name]
    policy, ref, valid = ragged_case(5, 4, seed=3)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    weight = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, r, w: loss_fn(p, r, valid=valid, weight=w)[0], (policy, ref, weight))


@pytest.mark.parametrize("loss_fn", [mlpo_loss, plackett_luce_loss, lipo_lambda_loss])
def test_reduction_none_gives_weighted_per_sample_losses_whose_mean_is_the_loss(loss_fn):
    policy, ref, valid = ragged_case(7, 4, seed=8)
    weight = torch.rand(7, dtype=torch.float64) * 2
    per_sample, metrics = loss_fn(policy, ref, valid=valid, weight=weight, reduction="none")
    mean, _ = loss_fn(policy, ref, valid=valid, weight=weight)
    unweighted, _ = loss_fn(policy, ref, valid=valid, reduction="none")
    assert per_sample.shape == (7,)
    torch.testing.assert_close(per_sample.mean(), mean)
    torch.testing.assert_close(per_sample, unweighted * weight)
    torch.testing.assert_close(metrics["loss"], mean)
    # Each sample's loss is the loss of that sample alone.
    for b in range(7):
        alone, _ = loss_fn(policy[b:b + 1], ref[b:b + 1], valid=valid[b:b + 1], reduction="none")
        torch.testing.assert_close(unweighted[b:b + 1], alone)
    assert float(unweighted[0]) == 0.0  # row 0 holds y_w alone


def test_mlpo_and_dpo_per_sample_match_their_loop_formulas():
    policy, ref, valid = ragged_case(6, 4, seed=5)
    per_sample, _ = mlpo_loss(policy, ref, gamma=0.3, valid=valid, reduction="none")
    for b in range(6):
        kept = [i for i in range(4) if valid[b, i]]
        r = {i: 0.3 * float(policy[b, i] - ref[b, i]) for i in kept}
        expected = -sum(math.log(1 / (1 + math.exp(-(r[0] - r[j])))) for j in kept[1:])
        expected -= sum(math.log(1 / (1 + math.exp(-(r[j] - r[m]))))
                        for p, j in enumerate(kept[1:]) for m in kept[1:][p + 1:])
        assert float(per_sample[b]) == pytest.approx(expected, rel=1e-10)
    dpo, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3, reduction="none")
    textbook = -torch.nn.functional.logsigmoid(0.3 * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])))
    torch.testing.assert_close(dpo, textbook)


def test_bad_reduction_and_labels_raise_one_clear_error():
    logps = torch.zeros(3, 4)
    for loss_fn in (mlpo_loss, plackett_luce_loss, lipo_lambda_loss):
        with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\), got 'sum'"):
            loss_fn(logps, logps, reduction="sum")
    with pytest.raises(ValueError, match="plackett_luce_loss: ref_logps has shape"):
        plackett_luce_loss(logps, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lipo_lambda_loss: labels has shape"):
        lipo_lambda_loss(logps, logps, labels=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="labels must be finite"):
        lipo_lambda_loss(logps, logps, labels=torch.full((3, 4), float("nan")))
