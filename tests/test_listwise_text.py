"""The listwise forward on text-only causal LMs (tiny random Llama and Qwen2, as AutoModelForCausalLM builds them):
per-response log-probs and every gradient equal transformers' own forward of each prompt + response, with k varying
in a batch; through a stock model, through the wrapper, and from hidden states + head weight."""
import pytest
import torch
from helpers import assert_gradients_match

from hscr_fast.listwise import ListwiseExample, listwise_logprobs, pack_examples, response_logprobs
from hscr_fast.models.causal_lm import CausalLanguageModel, as_listwise_model, text_example
from hscr_fast.models.tiny_text import build_tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest

PROMPTS = ["Is there a lesion?", "Where is the abnormality in the left lung?", "How many lesions are there?"]
ANSWERS = [["yes", "no", "the left upper lobe of the lung"],
           ["right lower lobe", "left lobe"],
           ["two", "one", "zero lesions are seen here", "three"]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_text_lm(request):
    model, tokenizer = build_tiny_causal_lm(request.param, seed=5)
    return request.param, model, tokenizer


def transformers_logps(model, prompts, responses):
    """One ordinary `model(input_ids)` per (prompt, response): transformers' own mask and positions, full logits."""
    out = torch.zeros(len(prompts), max(len(r) for r in responses))
    for b, (prompt, response_list) in enumerate(zip(prompts, responses)):
        for j, response in enumerate(response_list):
            ids = torch.tensor([list(prompt) + response[:-1]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:]
            out[b, j] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum()
    return out


def gradients(model, value):
    model.zero_grad()
    value.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("entry", ["stock model", "wrapper", "hidden states + head weight"])
def test_text_listwise_equals_transformers_forwards_values_and_gradients(tiny_text_lm, entry):
    decoder, model, tokenizer = tiny_text_lm
    lm = CausalLanguageModel(model, tokenizer)
    assert lm.options.prompt_format == ("chat-template" if decoder == "qwen2" else "plain")
    prompt_tokens = [lm.prompt_tokens(p) for p in PROMPTS]
    responses = [[lm.answer_tokens(p, a) for a in answers] for p, answers in zip(prompt_tokens, ANSWERS)]
    flat_prompts = [list(p.before_image) + list(p.after_image) for p in prompt_tokens]
    # A prompt given as plain token ids packs exactly like its PromptTokens.
    examples = [ListwiseExample(prompt_tokens[0], responses[0]), ListwiseExample(flat_prompts[1], responses[1]),
                ListwiseExample(prompt_tokens[2], responses[2])]
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    batch = pack_examples(model.get_input_embeddings(), examples)
    if entry == "stock model":
        packed = listwise_logprobs(model, batch)
    elif entry == "wrapper":
        packed = listwise_logprobs(lm, batch)
    else:
        hidden = model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids).last_hidden_state
        packed = response_logprobs(hidden, model.lm_head.weight, batch)
    valid = torch.tensor([[j < len(r) for j in range(4)] for r in responses])
    assert torch.equal(batch.valid, valid)
    assert batch.num_real_tokens == sum(len(p) + sum(len(r) - 1 for r in rs) for p, rs in zip(flat_prompts, responses))
    packed_grads = gradients(model, (packed * upstream * valid).sum())

    reference = transformers_logps(model, flat_prompts, responses)
    reference_grads = gradients(model, (reference * upstream * valid).sum())
    torch.testing.assert_close(packed.detach() * valid, reference.detach() * valid, rtol=1e-5, atol=1e-4)
    # Embeddings (tied to the head in Qwen2), every decoder layer, the final norm: all received gradients.
    assert assert_gradients_match(packed_grads, reference_grads) == sum(1 for _ in model.parameters())


def test_text_example_tokenises_like_the_whole_conversation(tiny_text_lm):
    """The prompt in the chat template when the tokenizer has one, the answer as its continuation, then EOS; the
    prompt's BOS is added once (Llama) or not at all (Qwen2 has none)."""
    decoder, _, tokenizer = tiny_text_lm
    example = text_example(tokenizer, PROMPTS[1], ANSWERS[1])
    prompt_ids = list(example.prompt.before_image) + list(example.prompt.after_image)
    if decoder == "qwen2":
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True,
                                             tokenize=False)
        assert example.prompt.before_image == ()
        expected_prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = PROMPTS[1]
        expected_prompt = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids == expected_prompt
    for answer, response in zip(ANSWERS[1], example.responses):
        assert response[-1] == tokenizer.eos_token_id
        whole = tokenizer(text + example.prompt.answer_separator + answer, add_special_tokens=False)["input_ids"]
        assert prompt_ids[len(example.prompt.before_image):] + response[:-1] == whole
        assert tokenizer.decode(response[:-1]).strip() == answer


def test_as_listwise_model_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="response_logprobs"):
        as_listwise_model(torch.nn.Linear(3, 3))


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        ListwiseExample([], [[1, 2]])


def test_eager_attention_gets_the_listwise_mask_as_scores_to_add(tiny_text_lm):
    """Eager attention adds its mask to the scores: the wrapper turns the listwise boolean mask into -inf/0 for it, so
    log-probs under eager equal transformers' own forward of each prompt + response (a boolean mask passed as it is
    would be added as 0/1)."""
    _, model, tokenizer = tiny_text_lm
    lm = CausalLanguageModel(model, tokenizer)
    examples = [text_example(tokenizer, prompt, answers) for prompt, answers in zip(PROMPTS, ANSWERS)]
    batch = pack_examples(model.get_input_embeddings(), examples)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            packed = listwise_logprobs(lm, batch)
            reference = transformers_logps(model, [list(e.prompt.before_image) + list(e.prompt.after_image)
                                                   for e in examples], [e.responses for e in examples])
    finally:
        model.set_attn_implementation(before)
    torch.testing.assert_close(packed * batch.valid, reference * batch.valid, rtol=1e-5, atol=1e-4)
