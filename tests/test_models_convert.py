"""The LLaVA-layout converter: a tiny checkpoint written in the original layout (LLaVA-Med v1.5's Mistral, or a
LLaVA-1.5-style Llama, with an mlp2x_gelu or a linear projector) converts to transformers' Llava layout and gives the
same logits as an independent forward over the original weights."""
import json

import pytest
import torch
from helpers import make_images
from safetensors.torch import save_file

from hscr_fast.models.convert import main as convert_main
from hscr_fast.models.prompting import format_prompt, tokenize_prompt
from hscr_fast.models.vlm import load_vlm

ARCHITECTURES = {"mistral": ("LlavaMistralForCausalLM", "llava_mistral"),
                 "llama": ("LlavaLlamaForCausalLM", "llava_llama")}


def write_original_layout(tiny_llava, out, *, embed_vision: bool, text_model: str = "mistral",
                          projector: str = "mlp2x_gelu"):
    """The tiny model's weights and config as LLaVA saves them (LlavaMistralForCausalLM for LLaVA-Med v1.5). A linear
    projector gets fresh random weights (the tiny model's own projector has two layers)."""
    model, processor = tiny_llava
    architecture, model_type = ARCHITECTURES[text_model]
    vision_dir = out.parent / (out.name + "-clip")
    model.model.vision_tower.save_pretrained(vision_dir)
    processor.image_processor.save_pretrained(vision_dir)
    text = model.config.text_config.to_dict()
    config = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "transformers_version")}
    config.update(architectures=[architecture], model_type=model_type, torch_dtype="float32",
                  mm_vision_tower=str(vision_dir), mm_hidden_size=model.config.vision_config.hidden_size,
                  mm_projector_type=projector, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  image_aspect_ratio="pad", mm_use_im_start_end=False)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = tensor
        elif key.startswith("model.multi_modal_projector.linear_") and projector == "mlp2x_gelu":
            index, leaf = key[len("model.multi_modal_projector.linear_"):].split(".", 1)
            state[f"model.mm_projector.{0 if index == '1' else 2}.{leaf}"] = tensor
        elif key.startswith("model.vision_tower.") and embed_vision:
            state["model.vision_tower.vision_tower." + key[len("model.vision_tower."):]] = tensor
        elif key == "lm_head.weight":
            state[key] = tensor
    if projector == "linear":
        generator = torch.Generator().manual_seed(3)
        shape = (model.config.text_config.hidden_size, model.config.vision_config.hidden_size)
        state["model.mm_projector.weight"] = torch.randn(shape, generator=generator) * 0.2
        state["model.mm_projector.bias"] = torch.randn(shape[0], generator=generator) * 0.2
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(out)
    return vision_dir


def original_logits(src, vision_dir, input_embeds_parts, pixel_values):
    """Independent forward: the causal LM from the original weights, CLIP from its own directory, the projector by
    hand."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    weights = load_file(str(src / "model.safetensors"))
    original = json.loads((src / "config.json").read_text())
    config_class, model_class = {"llava_mistral": (MistralConfig, MistralForCausalLM),
                                 "llava_llama": (LlamaConfig, LlamaForCausalLM)}[original["model_type"]]
    config = config_class(**{k: v for k, v in original.items()
                             if k in config_class().to_dict() and k not in ("architectures", "model_type")})
    lm = model_class(config).eval()
    lm.load_state_dict({k: v for k, v in weights.items() if not k.startswith("model.mm_projector")
                        and not k.startswith("model.vision_tower")})
    clip = CLIPVisionModel.from_pretrained(vision_dir).eval()
    with torch.no_grad():
        features = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        if original["mm_projector_type"] == "linear":
            visual = features @ weights["model.mm_projector.weight"].T + weights["model.mm_projector.bias"]
        else:
            hidden = torch.nn.functional.gelu(features @ weights["model.mm_projector.0.weight"].T
                                              + weights["model.mm_projector.0.bias"])
            visual = hidden @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]
        before, after = input_embeds_parts
        embed = lm.get_input_embeddings()
        embeds = torch.cat([embed(before), visual[0], embed(after)])[None]
        return lm(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def tiny_llama_llava():
    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava

    return build_tiny_llava(TinyLlavaSpec(text_model="llama", seed=1))


@pytest.mark.parametrize("embed_vision, text_model, projector", [
    (True, "mistral", "mlp2x_gelu"), (False, "mistral", "mlp2x_gelu"), (False, "llama", "mlp2x_gelu"),
    (True, "llama", "linear")], ids=["llava-med-v1.5-vision-in-checkpoint", "llava-med-v1.5-vision-from-clip-dir",
                                     "llama-mlp2x", "llama-linear-projector"])
def test_converted_checkpoint_gives_original_logits(tmp_path, tiny_llava, tiny_llama_llava,
                                                    embed_vision, text_model, projector):
    src, dst = tmp_path / "llava-med", tmp_path / "converted"
    vision_dir = write_original_layout(tiny_llava if text_model == "mistral" else tiny_llama_llava, src,
                                       embed_vision=embed_vision, text_model=text_model, projector=projector)
    args = [str(src), str(dst)] + (["--vision-tower", str(vision_dir)] if embed_vision else [])
    assert convert_main(args) == 0
    converted_config = json.loads((dst / "config.json").read_text())
    assert converted_config["architectures"] == ["LlavaForConditionalGeneration"]
    assert converted_config["text_config"]["model_type"] == text_model

    vlm = load_vlm(dst)
    assert vlm.options.image_aspect_ratio == "pad" and vlm.options.prompt_format == "llava-med"
    prompt = tokenize_prompt(vlm.tokenizer, format_prompt("Is there a lesion in the left lung?", vlm.tokenizer))
    pixels = vlm.preprocess_images(make_images(1, seed=5))
    before, after = torch.tensor(prompt.before_image), torch.tensor(prompt.after_image)
    expected = original_logits(src, vision_dir, (before, after), pixels)
    # The converted checkpoint through transformers' own Llava forward (placeholder tokens + pixel values) ...
    image_id = vlm.config.image_token_id
    ids = torch.tensor([prompt.before_image + (image_id,) * vlm.num_visual_tokens + prompt.after_image])
    with torch.no_grad():
        converted = vlm.llava(input_ids=ids, pixel_values=pixels).logits
        # ... and through hscr_fast's pieces.
        visual = vlm.encode_images(pixels)[0]
        embeds = torch.cat([vlm.embed_tokens(before), visual, vlm.embed_tokens(after)])[None]
        pieces = vlm.decoder_hidden_states(embeds) @ vlm.lm_head_weight.T
    vocab = expected.shape[-1]
    torch.testing.assert_close(converted[..., :vocab], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces[..., :vocab], expected, rtol=1e-5, atol=1e-5)


def test_convert_reports_bad_sources(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["LlavaMistralForCausalLM"],
                                                              "mm_projector_type": "qformer"}))
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "mm_projector_type 'qformer' is not supported; supported: mlp2x_gelu, linear" in capsys.readouterr().err
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"],
                                                              "mm_projector_type": "linear",
                                                              "mm_use_im_start_end": True}))
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "mm_use_im_start_end is true" in capsys.readouterr().err
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["LlavaQwenForCausalLM"]}))
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "'LlavaQwenForCausalLM' is not an original LLaVA layout" in capsys.readouterr().err
