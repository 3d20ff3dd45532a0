"""Qwen2-VL and Qwen2.5-VL: dynamic resolution (each image its own number of visual tokens) and 3D rotary positions
(M-RoPE).

- Our pieces with our positions give the logits of transformers' own forward (whose positions come from its
  `get_rope_index`); plain 1D positions would not.
- The prefix-shared listwise forward equals transformers' own forward of each prompt + response, in log-probs and in
  every parameter's gradient.
- LoRA adapts the decoder only, and `--train-projector` trains the vision merger.
(generate → train → evaluate on a saved Qwen2-VL checkpoint: test_model_families.py.)
"""
import pytest
import torch
from helpers import assert_gradients_match, make_images

from hscr_fast.listwise import ListwiseExample, listwise_logprobs, pack_examples
from hscr_fast.models.positions import prefix_positions, text_positions
from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
from hscr_fast.models.vlm import GridPixels, VisionLanguageModel

IMAGE_SIZES = ((60, 50), (41, 77), (120, 40), (90, 33))
QUESTIONS = ["Is there a lesion?", "Where is the abnormality in the left lung?", "How many lesions are there?"]
ANSWERS = [["yes", "no", "the left upper lobe of the lung"], ["right lower lobe", "left lobe"],
           ["two", "one", "zero lesions are seen here", "three"]]


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def qwen(request):
    model, processor = build_tiny_llava(TinyLlavaSpec(family=request.param, seed=5))
    return VisionLanguageModel(model, processor)


def transformers_logits(vlm, prompt, answer_ids, pixels: GridPixels, index: int) -> torch.Tensor:
    """transformers' own Qwen2-VL forward of prompt + image + answer (teacher-forced), logits [L, V]."""
    image_id = vlm.config.image_token_id
    ids = list(prompt.before_image) + [image_id] * pixels.token_counts[index] + list(prompt.after_image) + answer_ids
    one = pixels[index]
    token_types = torch.tensor([[int(t == image_id) for t in ids]])
    return vlm.llava(input_ids=torch.tensor([ids]), pixel_values=one.pixel_values, image_grid_thw=one.image_grid_thw,
                     mm_token_type_ids=token_types).logits[0]


def test_pieces_with_3d_positions_give_transformers_logits(qwen):
    vlm = qwen
    assert vlm.uses_mrope and vlm.options.prompt_format == "chat-template"
    pixels = vlm.preprocess_images(make_images(len(IMAGE_SIZES), seed=1, sizes=IMAGE_SIZES))
    visual, layouts = vlm.encode_images(pixels), vlm.visual_layouts(pixels)
    assert [v.shape[0] for v in visual] == vlm.visual_token_counts(pixels) and len(set(pixels.token_counts)) > 1
    prompt = vlm.prompt_tokens("Is there a lesion in the left lung?")
    answer = vlm.answer_tokens(prompt, "yes, two lesions")[:-1]
    with torch.no_grad():
        for index in range(len(IMAGE_SIZES)):
            theirs = transformers_logits(vlm, prompt, answer, pixels, index)
            embeds = torch.cat([vlm.embed_tokens(torch.tensor(prompt.before_image)), visual[index],
                                vlm.embed_tokens(torch.tensor(list(prompt.after_image) + answer))])[None]
            positions, answer_start = prefix_positions(len(prompt.before_image), visual[index].shape[0],
                                                       len(prompt.after_image), layouts[index])
            positions = torch.cat([positions, text_positions(answer_start, len(answer), mrope=True)], dim=1)
            ours = vlm.decoder_hidden_states(embeds, None, positions[:, None])[0] @ vlm.lm_head_weight.T
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            flat = vlm.decoder_hidden_states(embeds)[0] @ vlm.lm_head_weight.T
            assert (flat - theirs).abs().max() > 1e-3  # 1D positions are not what Qwen2-VL was trained with


def test_listwise_equals_transformers_forwards_values_and_gradients(qwen):
    vlm = qwen
    prompts = [vlm.prompt_tokens(q) for q in QUESTIONS]
    responses = [[vlm.answer_tokens(p, a) for a in answers] for p, answers in zip(prompts, ANSWERS)]
    pixels = vlm.preprocess_images(make_images(3, seed=7, sizes=IMAGE_SIZES))
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    params = list(vlm.model.parameters())

    vlm.model.zero_grad()
    visual, layouts = vlm.encode_images(pixels), vlm.visual_layouts(pixels)
    batch = pack_examples(vlm.embed_tokens, [ListwiseExample(p, r, visual[b], visual_layout=layouts[b])
                                             for b, (p, r) in enumerate(zip(prompts, responses))])
    assert batch.position_ids.shape[0] == 3
    listwise = listwise_logprobs(vlm, batch)
    (listwise * upstream * batch.valid).sum().backward()
    listwise_grads = [None if p.grad is None else p.grad.clone() for p in params]

    vlm.model.zero_grad()
    reference = torch.zeros(3, 4)
    for b, (prompt, response_list) in enumerate(zip(prompts, responses)):
        for j, response in enumerate(response_list):
            logits = transformers_logits(vlm, prompt, response[:-1], pixels, b)[-len(response):]
            reference[b, j] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum()
    (reference * upstream * batch.valid).sum().backward()
    reference_grads = [None if p.grad is None else p.grad.clone() for p in params]
    vlm.model.zero_grad()

    torch.testing.assert_close(listwise.detach() * batch.valid, reference.detach() * batch.valid, rtol=1e-5,
                               atol=1e-4)
    # vision tower, merger, decoder layers, embeddings all received gradients
    assert assert_gradients_match(listwise_grads, reference_grads) > 20


@pytest.mark.parametrize("family, projector", [("llava", "multi_modal_projector"), ("qwen2-vl", "merger")])
def test_lora_targets_the_decoder_and_train_projector_the_right_module(family, projector):
    from hscr_fast.training.config import TrainConfig
    from hscr_fast.training.loop import attach_lora

    vlm = VisionLanguageModel(*build_tiny_llava(TinyLlavaSpec(family=family)))
    trainable = attach_lora(vlm, TrainConfig(train_projector=True), "tiny")
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(".language_model.layers." in name for name in lora)  # never the vision tower
    assert any(f".{projector}." in name and "lora_" not in name for name in trainable)


def test_removed_visual_tokens_leave_the_others_at_their_own_3d_positions(qwen):
    """Dropout in `remove` mode: the packed forward equals a plain forward whose positions are transformers' own
    (`get_rope_index` over the whole, undropped prompt) with the dropped tokens' columns deleted."""
    from hscr_fast.models.dropout import visual_dropout

    vlm = qwen
    pixels = vlm.preprocess_images(make_images(2, seed=11, sizes=IMAGE_SIZES[1:]))
    visual, layouts = vlm.encode_images(pixels), vlm.visual_layouts(pixels)
    image_id = vlm.config.image_token_id
    examples, expected = [], torch.zeros(2, 4)
    with torch.no_grad():
        for b, (question, answers) in enumerate(zip(QUESTIONS[1:], ANSWERS[1:])):
            prompt = vlm.prompt_tokens(question)
            responses = [vlm.answer_tokens(prompt, a) for a in answers]
            dropout = visual_dropout(visual[b].shape[0], 0.5, global_seed=0, sample_id=b, mode="remove")
            tokens, _ = dropout.apply(visual[b])
            examples.append(ListwiseExample(prompt, responses, tokens, visual_layout=dropout.apply_layout(layouts[b])))
            n_before, n_visual = len(prompt.before_image), visual[b].shape[0]
            for j, response in enumerate(responses):
                ids = list(prompt.before_image) + [image_id] * n_visual + list(prompt.after_image) + response[:-1]
                positions, _ = vlm.llava.model.get_rope_index(
                    torch.tensor([ids]), torch.tensor([[int(t == image_id) for t in ids]]),
                    image_grid_thw=pixels.image_grid_thw[b:b + 1])
                keep = torch.ones(len(ids), dtype=torch.bool)
                keep[n_before:n_before + n_visual] = dropout.kept
                embeds = torch.cat([vlm.embed_tokens(torch.tensor(prompt.before_image)), tokens,
                                    vlm.embed_tokens(torch.tensor(list(prompt.after_image) + response[:-1]))])[None]
                hidden = vlm.decoder_hidden_states(embeds, None, positions[:, :, keep])[0, -len(response):]
                logps = torch.log_softmax(hidden @ vlm.lm_head_weight.T, -1)
                expected[b, j] = logps.gather(-1, torch.tensor(response)[:, None]).sum()
        batch = pack_examples(vlm.embed_tokens, examples)
        packed = listwise_logprobs(vlm, batch)
    torch.testing.assert_close(packed * batch.valid, expected * batch.valid, rtol=1e-5, atol=1e-4)
