"""Batched greedy generation: identical to one-at-a-time generation and to a cache-free reference loop."""
import torch
from helpers import make_images

from hscr_fast.evaluation.generation import GenerationPrompt, greedy_generate
from hscr_fast.models.dropout import visual_dropout


def reference_greedy(vlm, item, max_new_tokens):
    """No cache, no padding: re-run the whole sequence for every new token."""
    before = vlm.embed_tokens(torch.tensor(item.prompt.before_image))
    after = vlm.embed_tokens(torch.tensor(item.prompt.after_image))
    sequence = torch.cat([before, item.visual_tokens, after])
    attend = torch.ones(sequence.shape[0], dtype=torch.long)
    if item.visual_attendable is not None:
        attend[before.shape[0]:before.shape[0] + item.visual_tokens.shape[0]] = item.visual_attendable.long()
    tokens = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            hidden = vlm.decoder_hidden_states(sequence[None], attend[None])
            token = int((hidden[0, -1] @ vlm.lm_head_weight.T).argmax())
            if token == vlm.tokenizer.eos_token_id:
                break
            tokens.append(token)
            sequence = torch.cat([sequence, vlm.embed_tokens(torch.tensor([token]))])
            attend = torch.cat([attend, torch.ones(1, dtype=torch.long)])
    return tokens


def test_batched_equals_unbatched_and_reference(tiny_vlm):
    questions = ["Is there a lesion?", "Where is the abnormality in the left lung of this patient?", "How many?"]
    visual = tiny_vlm.encode_images(tiny_vlm.preprocess_images(make_images(3, seed=2))).detach()
    masked = visual_dropout(visual.shape[1], 0.7, global_seed=0, sample_id="q2", mode="mask")
    removed = visual_dropout(visual.shape[1], 0.7, global_seed=0, sample_id="q1", mode="remove")
    items = [
        GenerationPrompt(tiny_vlm.prompt_tokens(questions[0]), visual[0]),
        GenerationPrompt(tiny_vlm.prompt_tokens(questions[1]), removed.apply(visual[1])[0]),
        GenerationPrompt(tiny_vlm.prompt_tokens(questions[2]), visual[2], masked.kept),
    ]
    batched = greedy_generate(tiny_vlm, items, max_new_tokens=12)
    for item, tokens in zip(items, batched):
        assert greedy_generate(tiny_vlm, [item], max_new_tokens=12)[0] == tokens
        assert reference_greedy(tiny_vlm, item, 12) == tokens
    assert any(len(tokens) > 0 for tokens in batched)
