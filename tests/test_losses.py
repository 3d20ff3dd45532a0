"""MLPO and DPO losses against an independent per-pair loop in float64: values, metrics and gradients."""
import math

import pytest
import torch

from hscr_fast.losses import dpo_loss, mlpo_loss


def loop_reference(policy, ref, valid, gamma, explicit=True, implicit=True, weight=None):
    """Eqs. 5–7 written as plain loops over samples and pairs, in float64, differentiable through autograd."""
    policy, ref = policy.double(), ref.double()
    batch, width = policy.shape
    per_sample = []
    explicit_margins, implicit_margins = [], []
    for b in range(batch):
        reward = [gamma * (policy[b, i] - ref[b, i]) for i in range(width)]
        kept = [i for i in range(1, width) if valid[b, i]]
        sample_loss = policy.new_zeros(())
        for j in kept:
            explicit_margins.append(float((reward[0] - reward[j]).detach()))
            if explicit:
                sample_loss = sample_loss - torch.log(torch.sigmoid(reward[0] - reward[j]))
        for position, j in enumerate(kept):
            for m in kept[position + 1:]:
                implicit_margins.append(float((reward[j] - reward[m]).detach()))
                if implicit:
                    sample_loss = sample_loss - torch.log(torch.sigmoid(reward[j] - reward[m]))
        if weight is not None:
            sample_loss = sample_loss * weight[b].double()
        per_sample.append(sample_loss)
    return torch.stack(per_sample).sum() / batch, explicit_margins, implicit_margins


def random_case(batch, num_rejected, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    width = num_rejected + 1
    # Sequence log-probs of short answers: negative, a few nats apart, so margins straddle 0.
    policy = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 30
    ref = policy + torch.randn(batch, width, generator=generator, dtype=torch.float64) * 5
    # Each row keeps a random number k in 0..K of dispreferred responses (a prefix, as re-ranking produces) ...
    kept = torch.randint(0, num_rejected + 1, (batch,), generator=generator)
    valid = torch.arange(width)[None, :] <= kept[:, None]
    # ... the last row keeps all K, and in batches of 3 or more row 0 keeps only y_w (the "no pair" row).
    valid[-1] = True
    if batch >= 3:
        valid[0, 1:] = False
    return policy.to(dtype), ref.to(dtype), valid


CASES = [(batch, k, seed) for batch in (1, 3, 7) for k in (1, 2, 3, 4) for seed in (0, 1)]


@pytest.mark.parametrize("batch,num_rejected,seed", CASES)
@pytest.mark.parametrize("explicit,implicit", [(True, True), (True, False), (False, True)])
def test_loss_and_gradients_match_loop_reference(batch, num_rejected, seed, explicit, implicit):
    policy, ref, valid = random_case(batch, num_rejected, seed)
    gamma = 0.37
    policy_ours = policy.clone().requires_grad_(True)
    policy_ref = policy.double().clone().requires_grad_(True)

    loss, _ = mlpo_loss(policy_ours, ref, gamma=gamma, valid=valid, explicit=explicit, implicit=implicit)
    expected, _, _ = loop_reference(policy_ref, ref, valid, gamma, explicit, implicit)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    loss.backward()
    if expected.requires_grad:
        expected.backward()
        expected_grad = policy_ref.grad
    else:  # implicit-only with no implicit pair anywhere: the loss is a constant 0
        expected_grad = torch.zeros_like(policy_ref)
    torch.testing.assert_close(policy_ours.grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    # Missing responses get exactly zero gradient.
    assert torch.all(policy_ours.grad[~valid] == 0)


@pytest.mark.parametrize("batch,num_rejected,seed", CASES[::3])
def test_float64_matches_loop_reference_tightly(batch, num_rejected, seed):
    policy, ref, valid = random_case(batch, num_rejected, seed, dtype=torch.float64)
    policy.requires_grad_(True)
    loss, _ = mlpo_loss(policy, ref, gamma=0.1, valid=valid)
    expected, _, _ = loop_reference(policy, ref, valid, 0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    (ours,) = torch.autograd.grad(loss, policy)
    (theirs,) = torch.autograd.grad(expected, policy)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_gradcheck_policy_and_reference():
    policy, ref, valid = random_case(5, 3, seed=3, dtype=torch.float64)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    weight = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, r, w: mlpo_loss(p, r, valid=valid, weight=w)[0], (policy, ref, weight))


@pytest.mark.parametrize("batch,num_rejected,seed", [(3, 2, 0), (7, 4, 1), (5, 3, 2)])
def test_metrics_match_loop_reference(batch, num_rejected, seed):
    policy, ref, valid = random_case(batch, num_rejected, seed, dtype=torch.float64)
    gamma = 0.2
    loss, metrics = mlpo_loss(policy.clone().requires_grad_(True), ref, gamma=gamma, valid=valid)
    assert loss.requires_grad  # the policy is differentiable here, so detached metrics below is a real check
    _, explicit_margins, implicit_margins = loop_reference(policy, ref, valid, gamma)

    assert int(metrics["num_pairs_explicit"]) == len(explicit_margins)
    assert int(metrics["num_pairs_implicit"]) == len(implicit_margins)
    assert float(metrics["margin_explicit"]) == pytest.approx(sum(explicit_margins) / len(explicit_margins))
    assert float(metrics["accuracy_explicit"]) == pytest.approx(
        sum(m > 0 for m in explicit_margins) / len(explicit_margins))
    if implicit_margins:
        assert float(metrics["margin_implicit"]) == pytest.approx(sum(implicit_margins) / len(implicit_margins))
        assert float(metrics["accuracy_implicit"]) == pytest.approx(
            sum(m > 0 for m in implicit_margins) / len(implicit_margins))
    else:
        assert math.isnan(float(metrics["margin_implicit"]))

    rewards = gamma * (policy - ref)
    for column in range(num_rejected + 1):
        rows = [b for b in range(batch) if valid[b, column]]
        if rows:
            column_mean = sum(float(rewards[b, column]) for b in rows) / len(rows)
            assert float(metrics["rewards"][column]) == pytest.approx(column_mean)
        else:
            assert math.isnan(float(metrics["rewards"][column]))
    assert float(metrics["reward_chosen"]) == pytest.approx(float(rewards[:, 0].mean()))
    rejected = [float(rewards[b, i]) for b in range(batch) for i in range(1, num_rejected + 1) if valid[b, i]]
    assert float(metrics["reward_rejected_mean"]) == pytest.approx(sum(rejected) / len(rejected))
    assert all(not value.requires_grad for value in metrics.values())
    assert float(metrics["loss"]) == pytest.approx(float(metrics["loss_explicit"] + metrics["loss_implicit"]))


def test_equal_policy_and_reference_gives_log2_per_pair():
    """All margins 0 → every pair costs log 2: K explicit pairs and K(K−1)/2 implicit pairs per full sample."""
    logps = torch.randn(4, 4)
    loss, metrics = mlpo_loss(logps, logps.clone())
    assert float(metrics["loss_explicit"]) == pytest.approx(3 * math.log(2))
    assert float(metrics["loss_implicit"]) == pytest.approx(3 * math.log(2))
    assert float(loss) == pytest.approx(6 * math.log(2))
    assert float(metrics["accuracy_explicit"]) == 0.0  # a zero margin is not a win


def test_row_with_only_preferred_counts_in_the_mean_with_zero_loss():
    policy, ref, _ = random_case(2, 3, seed=5)
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[1, 1:] = False
    loss_two_rows, metrics = mlpo_loss(policy, ref, valid=valid)
    loss_first_row, _ = mlpo_loss(policy[:1], ref[:1])
    # The empty row adds 0 to the sum and 1 to the denominator (documented choice: divide by B).
    torch.testing.assert_close(loss_two_rows, loss_first_row / 2)
    assert int(metrics["num_pairs_explicit"]) == 3 and int(metrics["num_pairs_implicit"]) == 3


def test_placeholders_in_missing_cells_never_leak():
    policy, ref, valid = random_case(7, 4, seed=2)
    valid[2, 1:] = True
    valid[3, 2:] = False
    poisoned_policy, poisoned_ref = policy.clone(), ref.clone()
    poisoned_policy[~valid] = float("nan")
    poisoned_ref[~valid] = float("-inf")
    poisoned_policy.requires_grad_(True)
    loss, metrics = mlpo_loss(poisoned_policy, poisoned_ref, valid=valid)
    clean_loss, clean_metrics = mlpo_loss(policy, ref, valid=valid)
    torch.testing.assert_close(loss, clean_loss)
    loss.backward()
    assert torch.isfinite(poisoned_policy.grad).all()
    assert torch.all(poisoned_policy.grad[~valid] == 0)
    for name in ("margin_explicit", "margin_implicit", "reward_rejected_mean"):
        torch.testing.assert_close(metrics[name], clean_metrics[name])


def test_explicit_and_implicit_switches_select_the_terms():
    policy, ref, valid = random_case(5, 3, seed=7)
    both, metrics = mlpo_loss(policy, ref, valid=valid)
    explicit_only, _ = mlpo_loss(policy, ref, valid=valid, implicit=False)
    implicit_only, _ = mlpo_loss(policy, ref, valid=valid, explicit=False)
    torch.testing.assert_close(explicit_only, metrics["loss_explicit"])
    torch.testing.assert_close(implicit_only, metrics["loss_implicit"])
    torch.testing.assert_close(both, explicit_only + implicit_only)
    assert float(explicit_only) > 0 and float(implicit_only) > 0


def test_weights_multiply_each_sample_without_normalisation():
    policy, ref, valid = random_case(7, 3, seed=11)
    weight = torch.rand(7) * 3
    weight[4] = 0.0
    policy.requires_grad_(True)
    loss, _ = mlpo_loss(policy, ref, valid=valid, weight=weight)
    expected, _, _ = loop_reference(policy, ref, valid, 0.1, weight=weight)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.all(policy.grad[4] == 0)
    # Uniform weight c scales the loss by c: nothing renormalises the weights.
    scaled, _ = mlpo_loss(policy.detach(), ref, valid=valid, weight=torch.full((7,), 2.5))
    unweighted, _ = mlpo_loss(policy.detach(), ref, valid=valid)
    torch.testing.assert_close(scaled, 2.5 * unweighted)


@pytest.mark.parametrize("batch", [1, 5])
def test_dpo_loss_equals_textbook_formula_and_mlpo_with_one_rejected(batch):
    generator = torch.Generator().manual_seed(batch)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        (-torch.rand(batch, generator=generator) * 20).requires_grad_(True) for _ in range(4))
    beta = 0.25
    weight = torch.rand(batch, generator=generator)

    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, weight=weight)
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    textbook = (-torch.log(torch.sigmoid(logits)) * weight).mean()
    torch.testing.assert_close(loss, textbook)

    grads = torch.autograd.grad(loss, (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    textbook_grads = torch.autograd.grad(textbook, (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    for ours, theirs in zip(grads, textbook_grads):
        torch.testing.assert_close(ours, theirs)

    mlpo, _ = mlpo_loss(torch.stack([policy_chosen, policy_rejected], 1), torch.stack([ref_chosen, ref_rejected], 1),
                        gamma=beta, weight=weight)
    torch.testing.assert_close(loss, mlpo)
    assert float(metrics["accuracy_explicit"]) == pytest.approx(float((logits > 0).float().mean()))
    assert int(metrics["num_pairs_implicit"]) == 0


def test_bad_inputs_raise_specific_errors():
    logps = torch.zeros(3, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, 0] = False
    with pytest.raises(ValueError, match=r"column 0.*rows \[1\]"):
        mlpo_loss(logps, logps, valid=valid)
    with pytest.raises(ValueError, match="bool"):
        mlpo_loss(logps, logps, valid=torch.ones(3, 4))
    with pytest.raises(ValueError, match="ref_logps has shape"):
        mlpo_loss(logps, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="K >= 1"):
        mlpo_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="weight must be"):
        mlpo_loss(logps, logps, weight=torch.ones(4))
    with pytest.raises(ValueError, match="at least one"):
        mlpo_loss(logps, logps, explicit=False, implicit=False)
    with pytest.raises(ValueError, match="policy_rejected"):
        dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3))
