"""The FlexAttention BlockMask of the listwise forward gives exactly the dense mask's visibility, and a decoder run with
transformers' flex attention gives the dense path's log-probs and gradients (LLaVA and LLaVA-NeXT, with and without
gradient checkpointing; transformers does not offer flex attention for Qwen2-VL's decoder, which keeps the dense path).

torch has no CPU backward for compiled flex attention (it refuses inputs that require grad on CPU). Here the flex
calls run torch's own unfused implementation of the same op (the reference its compiled kernels are checked against),
with that device check lifted; everything else is transformers' flex attention path unchanged (GQA, scaling, the
BlockMask handed to every layer). On CUDA the same tests run the compiled kernel (bench/gpu.sh runs them).
"""
import pytest
import torch
from helpers import assert_gradients_match, make_images
from torch.nn.attention import flex_attention as torch_flex

from hscr_fast.listwise import (
    ListwiseExample,
    listwise_attention_mask,
    listwise_logprobs,
    pack_examples,
)
from hscr_fast.listwise_attention import (
    FLEX_ATTENTION,
    AttentionChoiceError,
    apply_attention_choice,
    attention_mask_for,
    flex_attention_preferred,
    flex_attention_supported,
    listwise_block_mask,
    loading_attention,
)
from hscr_fast.models.dropout import visual_dropout

QUESTIONS = ["Is there a lesion?", "Where is the abnormality in the left lung?"]
# The unfused implementation is the point here; its "use torch.compile" advice is not.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ANSWERS = [["yes", "no", "the left upper lobe of the lung"], ["right lower lobe", "left lobe", "two", "none"]]


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def flex_runnable(monkeypatch):
    """On CUDA, transformers' flex attention as it runs (compiled). On CPU, the same path with torch's unfused flex
    implementation standing in for the compiled kernel (which has no CPU backward)."""
    if DEVICE.type == "cuda":
        return
    import transformers.integrations.flex_attention as hf_flex

    def unfused(query, key, value, training=False, **kwargs):
        return torch_flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", unfused)


def flex_visibility(block_mask, length: int) -> torch.Tensor:
    """bool [B, L, L]: which keys each query attends to under `block_mask`, read off torch's flex attention itself.
    With all scores equal, a query's output is the mean of the values of the keys it sees; one-hot values make the
    nonzero entries of the output exactly those keys (full blocks, partial blocks and skipped blocks included)."""
    batch = block_mask.shape[0]
    zeros = torch.zeros(batch, 1, length, 16, dtype=torch.float64)
    one_hot = torch.eye(length, dtype=torch.float64).expand(batch, 1, length, length)
    return torch_flex.flex_attention(zeros, zeros, one_hot.contiguous(), block_mask=block_mask)[:, 0] > 0


@pytest.mark.parametrize("block_size", [4, 8])
def test_block_mask_gives_the_dense_visibility(block_size):
    segments, attendable = [], []
    # Odd shapes: a prefix of 13 or 21, responses of 1..9 tokens, padding at the end of the shorter row; a few
    # prefix keys (dropped visual tokens) hidden from everyone.
    for prefix, lengths, hidden in [(13, [5, 1, 9, 3], [9, 10]), (21, [2, 7], [11, 12, 17])]:
        row = [0] * prefix + [j + 1 for j, n in enumerate(lengths) for _ in range(n)]
        segments.append(row)
        attendable.append([i not in hidden for i in range(len(row))])
    length = max(len(row) for row in segments)
    segment_ids = torch.tensor([row + [-1] * (length - len(row)) for row in segments])
    attendable_t = torch.tensor([row + [False] * (length - len(row)) for row in attendable])

    dense = listwise_attention_mask(segment_ids, attendable_t)[:, 0]
    block_mask = listwise_block_mask(segment_ids, attendable_t, block_size=block_size)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0  # both kinds of block
    assert torch.equal(flex_visibility(block_mask, length), dense)


def _build(family: str):
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import VisionLanguageModel

    model, processor = build_tiny_llava(TinyLlavaSpec(family=family, seed=5))
    return VisionLanguageModel(model.to(DEVICE), processor)


def _logps_and_gradients(vlm, pixels, prompts, responses, dropouts, upstream):
    vlm.model.zero_grad(set_to_none=True)
    visual = vlm.encode_images(pixels)
    layouts = vlm.visual_layouts(pixels)
    examples = []
    for b, (prompt, response_list) in enumerate(zip(prompts, responses)):
        tokens, attendable = dropouts[b].apply(visual[b])
        examples.append(ListwiseExample(prompt, response_list, tokens, attendable,
                                        visual_layout=None if layouts is None else layouts[b]))
    batch = pack_examples(vlm.embed_tokens, examples)
    logps = listwise_logprobs(vlm, batch)
    (logps * upstream).sum().backward()
    return logps.detach(), [None if p.grad is None else p.grad.clone() for p in vlm.model.parameters()], batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_flex_attention_equals_dense_values_and_gradients(flex_runnable, family,
                                                          checkpointing):
    vlm = _build(family)
    vlm.model.train()  # checkpointing recomputes only in training mode; the tiny models have no dropout
    if checkpointing:
        vlm.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts = [vlm.prompt_tokens(q) for q in QUESTIONS]
    responses = [[vlm.answer_tokens(p, a) for a in answers] for p, answers in zip(prompts, ANSWERS)]
    pixels = vlm.preprocess_images(make_images(2, seed=3))
    # "mask" dropout: some visual keys are hidden from every query, which the BlockMask must reproduce.
    dropouts = [visual_dropout(count, 0.5, global_seed=1, sample_id=i, mode="mask")
                for i, count in enumerate(vlm.visual_token_counts(pixels))]
    upstream = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    dense_logps, dense_grads, dense_batch = _logps_and_gradients(vlm, pixels, prompts, responses, dropouts, upstream)
    assert isinstance(attention_mask_for(vlm, dense_batch), torch.Tensor)
    vlm.language_model.set_attn_implementation(FLEX_ATTENTION)
    flex_logps, flex_grads, flex_batch = _logps_and_gradients(vlm, pixels, prompts, responses, dropouts, upstream)
    assert isinstance(flex_batch.block_mask, torch_flex.BlockMask)  # the flex path really ran

    torch.testing.assert_close(flex_logps, dense_logps, rtol=1e-5, atol=1e-5)
    assert assert_gradients_match(flex_grads, dense_grads) > 10


def test_qwen2_vl_keeps_the_dense_path():
    """transformers refuses flex attention for Qwen2-VL's decoder; the choice of path must know it. (If a later
    transformers adds it, this fails: then Qwen2-VL joins the equality test above.)"""
    vlm = _build("qwen2-vl")
    assert not flex_attention_supported(vlm)
    assert not flex_attention_preferred(vlm, torch.device("cuda"))
    with pytest.raises(ValueError, match="flex_attention"):
        vlm.language_model.set_attn_implementation(FLEX_ATTENTION)
    assert flex_attention_supported(_build("llava")) and flex_attention_supported(_build("llava-next"))
    assert not flex_attention_preferred(_build("llava"), torch.device("cpu"))


def test_the_training_choice_puts_only_a_supporting_decoder_on_flex_attention_and_only_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    llava = _build("llava")
    assert loading_attention("auto") == loading_attention(FLEX_ATTENTION) == "sdpa"
    assert loading_attention("eager") == "eager"
    assert apply_attention_choice(llava, "auto", cpu) == "sdpa"  # dense path on CPU
    assert apply_attention_choice(llava, "sdpa", cuda) == "sdpa"
    with pytest.raises(AttentionChoiceError, match="no backward on CPU"):
        apply_attention_choice(llava, FLEX_ATTENTION, cpu)
    assert apply_attention_choice(llava, "auto", cuda) == FLEX_ATTENTION  # (the choice needs no GPU to be made)
    assert llava.llava.config.vision_config._attn_implementation == "sdpa"  # the vision tower is left alone
    qwen = _build("qwen2-vl")
    assert apply_attention_choice(qwen, "auto", cuda) == "sdpa"
    with pytest.raises(AttentionChoiceError, match="no flex attention for the qwen2_vl decoder"):
        apply_attention_choice(qwen, FLEX_ATTENTION, cuda)
    with pytest.raises(AttentionChoiceError, match="choose one of"):
        apply_attention_choice(llava, "flash_attention_2", cuda)
