"""Training of the demo VLM on the phantom training set, on the CPU, nanoGPT style: two stages, top to bottom.

Everything starts from random weights — vision tower, projector and language model alike.

1. `vision_warmup`: the vision tower and projector learn to classify every patch as no / small / large lesion from
   the phantom's exact masks, through a throw-away linear head (the demo's stand-in for CLIP pretraining; why it is
   needed is explained at the stage).
2. `sft_train`, the SFT proper: every parameter, AdamW, linear warm-up then cosine decay, a fixed number of steps. A
   step takes `batch_size` training questions, runs the vision tower once per distinct image among them, packs every
   (prompt, answer) pair into one row with `hscr_fast.listwise.pack_examples` (one response per prompt: the packed
   forward is then the plain teacher-forced forward) and minimises the mean negative log-likelihood of the answer
   tokens (EOS included).

Log-probs: the demo vocabulary has ~500 tokens, so the answer positions' full logits `hidden @ lm_headᵀ` take a few
hundred kilobytes and a plain cross-entropy is the simplest exact choice; the fused kernel
(`hscr_fast.kernels.fused_linear_logprobs`) is for 32k-token vocabularies, whose logits would not fit.

Determinism: model weights come from the spec's seed; the warm-up's images and the SFT's question order come from
generators seeded by the configs (SFT: a fresh permutation per epoch); nothing else is random (the tiny configs have
no active dropout). With the same thread count a run is bit-for-bit repeatable.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hscr_fast.data.images import load_image
from hscr_fast.data.records import VQARecord
from hscr_fast.listwise import ListwiseExample, answer_hidden_states, pack_examples
from hscr_fast.models.prompting import PromptTokens

# -- stage 1: vision warm-up on the lesion masks -----------------------------------------------------------------------
#
# Why: a real LLaVA starts from a pretrained CLIP tower. Trained from random weights by SFT alone, the demo model sits
# on the question-only loss for thousands of steps (measured: > 2,000 steps of batch 32): the language model learns the
# answer priors at once, while the tower gets gradient only through near-uniform attention, too weak to learn a
# lesion detector quickly. So the tower (with the projector) first learns, for ~20 s, to classify every patch as
# no lesion / small lesion / large lesion from the phantom's exact masks — the demo's stand-in for CLIP pretraining —
# through a linear head that is then thrown away. SFT then trains every parameter, the tower at a reduced rate.

PATCH_CLASSES = ("none", "small", "large")


@dataclass
class VisionWarmupConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    num_threads: int = 2


def patch_lesion_classes(mask, lesions: list[dict], patch_size: int) -> torch.Tensor:
    """[num_patches] long, row-major: the `PATCH_CLASSES` index of the lesion covering most of each patch, 0 for none.

    `mask` [H, W] holds each pixel's lesion index (1-based, 0 = background); `lesions` the records' lesion dicts."""
    mask = torch.as_tensor(mask, dtype=torch.long)
    height, width = mask.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"a {width}x{height} mask does not tile into {patch_size}-px patches")
    size_class = torch.zeros(int(mask.max()) + 1, dtype=torch.long)
    for lesion in lesions:
        if lesion["index"] < size_class.numel():
            size_class[lesion["index"]] = PATCH_CLASSES.index(lesion["size"])
    patches = mask.view(height // patch_size, patch_size, width // patch_size, patch_size).permute(0, 2, 1, 3)
    patches = patches.reshape(-1, patch_size * patch_size)
    counts = torch.nn.functional.one_hot(patches, size_class.numel()).sum(1)  # [P, lesions + 1] pixel counts
    counts[:, 0] = 0
    dominant = counts.argmax(1)
    return torch.where(counts.amax(1) > 0, size_class[dominant], torch.zeros_like(dominant))


def prepare_patch_targets(vlm, records: list[VQARecord], mask_folder: str | Path) -> torch.Tensor:
    """[I, num_patches] patch classes for the distinct images of `records`, in `prepare_sft_data`'s row order. The
    records must carry the phantom's `mask` and `lesions` fields, and the images must already be the tower's size
    (the phantom's are), so that the preprocessed patches and the mask patches coincide."""
    import numpy as np
    from PIL import Image

    vision = vlm.config.vision_config
    targets = {}
    for record in records:
        if record.image in targets:
            continue
        if "mask" not in record.metadata or "lesions" not in record.metadata:
            raise ValueError(f"record {record.id!r} has no 'mask'/'lesions' fields: the vision warm-up needs phantom "
                             "records (hscr_fast.demo.phantom)")
        mask = np.array(Image.open(Path(mask_folder) / record.metadata["mask"]))
        if mask.shape != (vision.image_size, vision.image_size):
            raise ValueError(f"{record.metadata['mask']}: mask is {mask.shape[1]}x{mask.shape[0]} px; the vision tower "
                             f"expects {vision.image_size}x{vision.image_size} images")
        targets[record.image] = patch_lesion_classes(mask, record.metadata["lesions"], vision.patch_size)
    return torch.stack(list(targets.values()))


def vision_warmup(vlm, pixel_values: torch.Tensor, patch_targets: torch.Tensor, config: VisionWarmupConfig, *,
                  progress: bool = True) -> list[float]:
    """Trains the vision tower and projector to classify patches (`patch_targets` [I, P]) from their visual tokens;
    returns the per-step losses. Only the tower and projector change; the head is discarded."""
    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    generator = torch.Generator().manual_seed(config.seed)
    head = torch.nn.Linear(vlm.hidden_size, len(PATCH_CLASSES))
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        head.reset_parameters()
    modules = [vlm.llava.model.vision_tower, vlm.llava.model.multi_modal_projector]
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, foreach=True)
    losses = []
    vlm.model.train()
    try:
        for _ in tqdm(range(config.steps), desc="demo vision warm-up", unit="step", disable=not progress,
                      dynamic_ncols=True):
            rows = torch.randint(0, pixel_values.shape[0], (config.batch_size,), generator=generator)
            logits = head(vlm.encode_images(pixel_values[rows]))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), patch_targets[rows].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        vlm.model.eval()
        torch.set_num_threads(previous_threads)
    return losses


# -- stage 2: SFT ------------------------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    """The SFT recipe. Defaults are the "full" demo preset's (see `hscr_fast.demo.world.PRESETS`)."""

    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-4  # the cosine decays to this, not to zero
    warmup_steps: int = 60
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # The vision tower's learning rate relative to the rest: low, so that the lesion features of the warm-up stage
    # survive the first steps, when the language model is random and its gradients are large and uninformative.
    vision_learning_rate_scale: float = 0.1
    seed: int = 0
    num_threads: int = 2  # torch intra-op threads: the demo's budget is 2 CPU cores

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SFTConfig.{name} must be ≥ 1, got {getattr(self, name)!r}")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"SFTConfig needs 0 < min_learning_rate ≤ learning_rate, got {self.min_learning_rate} "
                             f"and {self.learning_rate}")


@dataclass
class SFTData:
    """The training set in tensors and token ids, prepared once: pixels of every distinct image, and per question
    its image's row in `pixel_values`, its prompt tokens and its answer tokens (EOS included)."""

    pixel_values: torch.Tensor  # [I, 3, H, W]
    image_rows: list[int]
    prompts: list[PromptTokens]
    answers: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class SFTResult:
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0
    num_threads: int = 0

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / self.seconds if self.seconds else 0.0

    def loss_by_window(self, windows: int = 20) -> list[float]:
        """The loss curve as `windows` means of consecutive steps: a readable summary of a noisy per-step curve."""
        size = max(1, math.ceil(len(self.losses) / windows))
        chunks = (self.losses[start:start + size] for start in range(0, len(self.losses), size))
        return [sum(chunk) / len(chunk) for chunk in chunks]


def prepare_sft_data(vlm, records: list[VQARecord], image_folder: str | Path, *, image_batch: int = 256) -> SFTData:
    """Loads and preprocesses every distinct image once and tokenises every question and answer."""
    if not records:
        raise ValueError("prepare_sft_data: no training records")
    distinct = list(dict.fromkeys(record.image for record in records))
    row_of = {image: row for row, image in enumerate(distinct)}
    chunks = []
    for start in range(0, len(distinct), image_batch):
        images = [load_image(Path(image_folder) / name) for name in distinct[start:start + image_batch]]
        chunks.append(vlm.preprocess_images(images))
    prompts = [vlm.prompt_tokens(record.question) for record in records]
    answers = [vlm.answer_tokens(prompt, record.answer) for prompt, record in zip(prompts, records)]
    return SFTData(torch.cat(chunks), [row_of[record.image] for record in records], prompts, answers)


def learning_rate_at(step: int, config: SFTConfig) -> float:
    """Linear warm-up to `learning_rate`, then cosine decay to `min_learning_rate` at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def sft_loss(vlm, data: SFTData, indices: list[int]) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens of the questions `indices` (one packed forward)."""
    rows = [data.image_rows[i] for i in indices]
    distinct_rows = list(dict.fromkeys(rows))
    visual = vlm.encode_images(data.pixel_values[distinct_rows])
    position_of = {row: k for k, row in enumerate(distinct_rows)}
    examples = [ListwiseExample(data.prompts[i], [data.answers[i]], visual[position_of[row]])
                for i, row in zip(indices, rows)]
    batch = pack_examples(vlm.embed_tokens, examples)
    hidden = answer_hidden_states(vlm, batch)
    logits = hidden.float() @ vlm.lm_head_weight.float().T
    return F.cross_entropy(logits, batch.score_labels)


def _question_order(num_questions: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """`steps` batches of question indices: consecutive epochs, each a fresh seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(num_questions, generator=generator).tolist()
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def sft_train(vlm, data: SFTData, config: SFTConfig, *, progress: bool = True) -> SFTResult:
    """Trains every parameter of `vlm.model` in place; returns the per-step losses. The model is left in eval mode."""
    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    model = vlm.model
    vision = {id(p) for p in vlm.llava.model.vision_tower.parameters()}
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for in_vision, scale in ((False, 1.0), (True, config.vision_learning_rate_scale)):
        members = [p for p in parameters if (id(p) in vision) == in_vision]
        # Weight decay on matrices only (nanoGPT): decaying norms' gains and biases only hurts a model this small.
        groups += [{"params": [p for p in members if p.dim() >= 2], "weight_decay": config.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for p in members if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, foreach=True)
    batches = _question_order(len(data), config.steps, config.batch_size, config.seed)

    result = SFTResult(num_threads=config.num_threads)
    model.train()
    started = time.perf_counter()
    try:
        bar = tqdm(batches, desc="demo SFT", unit="step", disable=not progress, dynamic_ncols=True)
        for step, indices in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, config) * group["lr_scale"]
            loss = sft_loss(vlm, data, indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            result.losses.append(loss.item())
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        bar.close()
    finally:
        result.seconds = time.perf_counter() - started
        model.eval()
        torch.set_num_threads(previous_threads)
    return result
