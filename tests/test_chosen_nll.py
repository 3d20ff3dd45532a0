"""The optional NLL of the preferred response (RPO-style), added to any preference loss."""
import json

import pytest
import torch
from helpers import write_preference_lists

from hscr_fast.losses import mlpo_loss
from hscr_fast.training.objective import Objective, ScoredBatch, batch_loss, score_batch


def random_scored(seed: int, rows: int = 5, slots: int = 4) -> ScoredBatch:
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(rows, slots, generator=generator) > 0.3
    valid[:, :2] = True  # every list has y_w and at least one y_l
    policy = (-10 * torch.rand(rows, slots, generator=generator, dtype=torch.float64)).requires_grad_()
    reference = -10 * torch.rand(rows, slots, generator=generator, dtype=torch.float64)
    weights = 0.5 + torch.rand(rows, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, 9, (rows,), generator=generator).double()
    return ScoredBatch(policy, reference, valid, weights, None, 0, lengths)


@pytest.mark.parametrize("loss", ["mlpo", "dpo", "plackett-luce"])
def test_loss_is_the_preference_loss_plus_the_weighted_per_token_nll(loss):
    scored = random_scored(3)
    objective = Objective(loss=loss, chosen_nll_weight=0.3)
    total, metrics = batch_loss(scored, objective)
    (grad,) = torch.autograd.grad(total, scored.policy_logps)

    # Plain reference: the same preference loss without the term, plus a per-list loop of α·w_b·(−log π(y_w)/|y_w|).
    policy = scored.policy_logps.detach().clone().requires_grad_()
    without, _ = batch_loss(ScoredBatch(policy, scored.ref_logps, scored.valid, scored.weights, None, 0),
                            Objective(loss=loss))
    rows = policy.shape[0]
    nll = sum(scored.weights[b] * -policy[b, 0] / scored.chosen_tokens[b] for b in range(rows)) / rows
    expected = without + 0.3 * nll
    (expected_grad,) = torch.autograd.grad(expected, policy, retain_graph=True)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-12, atol=0)
    assert metrics["chosen_nll"].item() == pytest.approx(nll.item(), rel=1e-12)
    # Only y_w's column gets the term's gradient.
    (plain_grad,) = torch.autograd.grad(without, policy)
    assert torch.equal(grad[:, 1:], plain_grad[:, 1:]) and not torch.equal(grad[:, 0], plain_grad[:, 0])


def test_off_by_default_and_recorded_in_the_run_identity_only_when_on():
    scored = random_scored(5)
    total, metrics = batch_loss(scored, Objective())
    expected, _ = mlpo_loss(scored.policy_logps, scored.ref_logps, gamma=0.1, valid=scored.valid,
                            weight=scored.weights)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12) and "chosen_nll" not in metrics
    assert "chosen_nll_weight" not in Objective().run_identity()  # checkpoints from before the option still resume
    assert Objective(chosen_nll_weight=0.5).run_identity()["chosen_nll_weight"] == 0.5


def test_score_batch_counts_the_preferred_responses_tokens(tiny_vlm, tmp_path):
    from hscr_fast.training.data import tokenize_preferences, validate_preferences

    root = write_preference_lists(tmp_path, {"prefs.jsonl": 5}, seed=2)
    items = tokenize_preferences(tiny_vlm, validate_preferences(root / "prefs.jsonl", root / "images"),
                                 root / "images")
    reference = {item.id: [0.0] * len(item.responses) for item in items}
    scored = score_batch(tiny_vlm, items, reference, Objective(chosen_nll_weight=1.0), torch.device("cpu"))
    assert scored.chosen_tokens.tolist() == [len(item.responses[0]) for item in items]
    assert len({len(item.responses[0]) for item in items}) > 1  # lengths differ, so a mix-up of rows would show
    assert score_batch(tiny_vlm, items, reference, Objective(), torch.device("cpu")).chosen_tokens is None


def test_training_logs_the_term_and_adds_it_to_the_loss(tmp_path, train_config):
    from hscr_fast.training.loop import train

    root = write_preference_lists(tmp_path, {"prefs.jsonl": 6}, seed=1)
    train(train_config(root, tmp_path / "nll", chosen_nll_weight=0.5, epochs=2, learning_rate=5e-3))
    rows = [json.loads(line) for line in (tmp_path / "nll" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    for row in rows:
        assert row["chosen_nll"] > 0
        assert row["loss"] == pytest.approx(row["loss_explicit"] + row["loss_implicit"] + 0.5 * row["chosen_nll"],
                                            rel=1e-5)
