"""The prefix-shared listwise forward equals independent full forwards of each prefix+response, in log-probs and in
every gradient, with responses of different lengths and k varying inside a batch."""
import pytest
import torch
from helpers import assert_gradients_match, make_images

from hscr_fast.listwise import ListwiseExample, listwise_attention_mask, listwise_logprobs, pack_examples
from hscr_fast.models.dropout import visual_dropout

QUESTIONS = ["Is there a lesion?", "Where is the abnormality in the left lung?", "How many lesions are there?"]
ANSWERS = [["yes", "no", "the left upper lobe of the lung"],
           ["right lower lobe", "left lobe"],
           ["two", "one", "zero lesions are seen here", "three"]]


def independent_logps(vlm, pixels, prompts, responses, dropouts=None):
    """One ordinary forward per (prompt, response): full logits, log_softmax, gather."""
    out = torch.zeros(len(prompts), max(len(r) for r in responses), dtype=torch.float32)
    for b, (prompt, response_list) in enumerate(zip(prompts, responses)):
        for j, response in enumerate(response_list):
            visual = vlm.encode_images(pixels[b:b + 1])[0]
            attend = torch.ones(visual.shape[0], dtype=torch.long)
            if dropouts is not None:
                visual, kept = dropouts[b].apply(visual)
                attend = kept.long()
            before = vlm.embed_tokens(torch.tensor(prompt.before_image))
            after = vlm.embed_tokens(torch.tensor(list(prompt.after_image) + response[:-1]))
            embeds = torch.cat([before, visual, after])[None]
            mask = torch.cat([torch.ones(before.shape[0], dtype=torch.long), attend,
                              torch.ones(after.shape[0], dtype=torch.long)])[None]
            hidden = vlm.decoder_hidden_states(embeds, mask)[0]
            prefix = before.shape[0] + visual.shape[0] + len(prompt.after_image)
            logits = hidden[prefix - 1:prefix - 1 + len(response)] @ vlm.lm_head_weight.T
            out[b, j] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum()
    return out


@pytest.fixture(scope="module")
def tiny_llama_vlm():
    """A LLaVA-1.5-style model: the same tiny shapes with a Llama decoder."""
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import VisionLanguageModel

    return VisionLanguageModel(*build_tiny_llava(TinyLlavaSpec(text_model="llama", seed=2)))


@pytest.fixture(scope="module")
def tiny_next_vlm():
    """LLaVA-NeXT: anyres tiling, so each of the test's images gives its own number of visual tokens."""
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import VisionLanguageModel

    return VisionLanguageModel(*build_tiny_llava(TinyLlavaSpec(family="llava-next", seed=3)))


MODELS = {"mistral": "tiny_vlm", "llama": "tiny_llama_vlm", "llava-next": "tiny_next_vlm"}


@pytest.mark.parametrize("dropout_mode, model", [(None, "mistral"), ("remove", "mistral"), ("mask", "mistral"),
                                                 ("mask", "llama"), (None, "llava-next"), ("remove", "llava-next")])
def test_listwise_equals_independent_forwards_values_and_gradients(request,
                                                                   dropout_mode, model):
    vlm = request.getfixturevalue(MODELS[model])
    prompts = [vlm.prompt_tokens(q) for q in QUESTIONS]
    responses = [[vlm.answer_tokens(p, a) for a in answers] for p, answers in zip(prompts, ANSWERS)]
    pixels = vlm.preprocess_images(make_images(3, seed=7))
    counts = vlm.visual_token_counts(pixels)
    if model == "llava-next":
        assert len(set(counts)) > 1  # the images' sizes give different numbers of visual tokens
    dropouts = None if dropout_mode is None else [
        visual_dropout(counts[i], 0.7, global_seed=0, sample_id=i, mode=dropout_mode) for i in range(3)]
    upstream = torch.randn(3, 4)
    params = [p for p in vlm.model.parameters()]

    vlm.model.zero_grad()
    visual = vlm.encode_images(pixels)
    examples = []
    for b in range(3):
        tokens, attendable = (visual[b], None) if dropouts is None else dropouts[b].apply(visual[b])
        examples.append(ListwiseExample(prompts[b], responses[b], tokens,
                                        None if dropout_mode != "mask" else attendable))
    batch = pack_examples(vlm.embed_tokens, examples)
    listwise = listwise_logprobs(vlm, batch)
    (listwise * upstream * batch.valid).sum().backward()
    listwise_grads = [None if p.grad is None else p.grad.clone() for p in params]

    vlm.model.zero_grad()
    reference = independent_logps(vlm, pixels, prompts, responses, dropouts)
    valid = torch.tensor([[j < len(r) for j in range(4)] for r in responses])
    (reference * upstream * valid).sum().backward()
    reference_grads = [None if p.grad is None else p.grad.clone() for p in params]
    vlm.model.zero_grad()

    assert torch.equal(batch.valid.cpu(), valid)
    torch.testing.assert_close(listwise.detach() * valid, reference.detach() * valid, rtol=1e-5, atol=1e-4)
    # vision tower, projector, decoder layers, embeddings all received gradients
    assert assert_gradients_match(listwise_grads, reference_grads) > 20


def test_packed_length_is_prefix_plus_answers(tiny_vlm):
    vlm = tiny_vlm
    prompt = vlm.prompt_tokens(QUESTIONS[2])
    responses = [vlm.answer_tokens(prompt, a) for a in ANSWERS[2]]
    visual = vlm.encode_images(vlm.preprocess_images(make_images(1)))[0]
    batch = pack_examples(vlm.embed_tokens, [ListwiseExample(prompt, responses, visual)])
    prefix = prompt.num_text_tokens + visual.shape[0]
    assert batch.num_real_tokens == prefix + sum(len(r) - 1 for r in responses)
    assert batch.score_labels.numel() == sum(len(r) for r in responses)


def test_attention_mask_structure():
    # prefix of 3, response 1 of 2 tokens, response 2 of 1 token, 1 pad; token 1 is a masked-out visual token.
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1]])
    attendable = torch.tensor([[True, False, True, True, True, True, False]])
    mask = listwise_attention_mask(segments, attendable)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_responses_under_different_images_share_a_prefix_only_per_image(tiny_vlm):
    """Image-side dispreference: one list, responses 0 and 2 under image A, response 1 under image B. Two packed
    examples feed one output row; each response's log-prob equals its own independent forward."""
    vlm = tiny_vlm
    prompt = vlm.prompt_tokens(QUESTIONS[0])
    answers = [vlm.answer_tokens(prompt, a) for a in ("yes", "yes", "no lesion")]
    pixels = vlm.preprocess_images(make_images(2, seed=3))
    visual = vlm.encode_images(pixels)
    examples = [ListwiseExample(prompt, [answers[0], answers[2]], visual[0], output_row=0, output_slots=[0, 2]),
                ListwiseExample(prompt, [answers[1]], visual[1], output_row=0, output_slots=[1])]
    batch = pack_examples(vlm.embed_tokens, examples)
    assert batch.valid.tolist() == [[True, True, True]]
    with torch.no_grad():
        packed = listwise_logprobs(vlm, batch)[0]
        image_a = independent_logps(vlm, pixels[0:1], [prompt], [[answers[0], answers[2]]])[0]
        image_b = independent_logps(vlm, pixels[1:2], [prompt], [[answers[1]]])[0]
    torch.testing.assert_close(packed, torch.stack([image_a[0], image_b[0], image_a[1]]), rtol=1e-5, atol=1e-4)
    # The same answer under two images: different log-probs (the image matters to the model).
    assert packed[0] != packed[1]
    with pytest.raises(ValueError, match="two responses map to output row 0, slot 2"):
        pack_examples(vlm.embed_tokens, [examples[0], ListwiseExample(prompt, [answers[1], answers[1]], visual[1],
                                                                      output_row=0, output_slots=[1, 2])])
