"""Lesion-region image corruption: the dispreferred *image* of an image-side preference pair.

A preference pair "same answer, clean image ≻ same answer, lesion-corrupted image" rewards a model for reading the
lesion. This module builds the lesion region (a bool [H, W] array, True = corrupt this pixel) from the annotations the
project's data carries, and corrupts it with seeded Gaussian noise.

Regions
- `region_mask_from_boxes(size, boxes)`: boxes `[x, y, w, h]` in pixels, top-left origin, covering columns
  x .. x+w-1 and rows y .. y+h-1 (SLAKE's `detection.json` and the phantom's `bbox` convention; fractional boxes
  cover every pixel they touch). `size` is PIL's `(width, height)`.
- `region_mask_from_label_mask(mask_image, values)`: pixels of a label mask whose value is one of `values`.
- `phantom_lesion_region(mask_path)`: the phantom world's exact mask (pixel value = lesion index, 0 = none).
- `slake_lesion_region(image_dir)`: SLAKE's `imgs/xmlabN/`: the label mask `mask.png` (values named by `mask.txt`)
  where it is a real label mask, else the `detection.json` boxes. SLAKE names organs and findings alike in both
  files; by default every label that is not a normal organ in `SLAKE_ORGAN_LABELS` counts as a lesion (so the tumour,
  edema, nodule, mass, effusion, ... boxes do, and "Liver" or "Left Lung" do not); `labels=` picks labels explicitly.
  Caveat found in the data: SLAKE's chest X-ray `mask.png` files (1024 px RGB) are copies of the scan, not label
  masks — their values are not in `mask.txt` — so for those the boxes are used, and `LesionRegion.note` says so.

Corruption (`corrupt_region`), two modes, both seeded (`numpy.random.default_rng(seed)`) and leaving every pixel
outside the region byte-identical:
- `replace` (MMedPO, Zhu et al. 2025, "local lesion-noising"): region pixels are replaced by N(μ, σ²) noise, so the
  region no longer carries any of its original content. MMedPO's released curation script
  (aiming-lab/MMedPO, `inference_attention-map_score.py`, `generate_noised_image`) assigns `np.random.normal(0, 10)` to
  the region pixels — near-black noise (and, as written, the negative draws wrap around when stored into the uint8
  array). Here μ and σ default to the image's own statistics *outside* the region (per-channel mean, mean per-channel
  standard deviation), so the patch matches the scan's brightness and contrast and depends on no pixel it replaces;
  `fill_mean=0, sigma=10` reproduces MMedPO's intent (clipped, no wrap-around).
- `add` (the fine-grained method, Mohammadizadehsamakosh et al. 2026, "lesion-corrupted images"): N(0, σ²) noise is
  added to the region pixels, which keep their content under the noise. σ defaults to the image's own standard
  deviation outside the region (signal-to-noise ≈ 1); the paper gives no value.
Noise is drawn once per pixel and shared by the three channels, so a grey scan stays grey (medical images almost
all are); values are rounded and clipped to [0, 255]. A region whose size differs from the image's is resized to it
(nearest neighbour) with a warning; an empty region raises `EmptyRegionError`.

Note: the region's outline survives corruption (the patch is where the lesion was). Use boxes or `margin` when the
lesion's exact shape should not be recoverable from the corrupted image.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from hscr_fast.data.images import to_rgb
from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.io import read_json_file

logger = logging.getLogger(__name__)

CORRUPTION_MODES = ("replace", "add")

# Normal anatomy among SLAKE's labels (mask.txt and every detection.json in the release). Everything else is a
# finding: Brain Edema, Brain Enhancing / Non-enhancing Tumor, Liver / Kidney / Lung Cancer, and the chest X-ray
# findings Atelectasis, Cardiomegaly, Effusion, Infiltrate, Mass, Nodule, Pneumonia, Pneumothorax.
SLAKE_ORGAN_LABELS = frozenset({
    "Bladder", "Brain Stem", "Colon", "Duodenum", "Esophagus", "Heart", "Larynx", "Left Ear", "Left Eye",
    "Left Femoral Head", "Left Humerus Head", "Left Kidney", "Left Lung", "Left Mandible", "Left Parotid",
    "Left Temporal Lobe", "Liver", "Rectum", "Right Ear", "Right Eye", "Right Femoral Head", "Right Humerus Head",
    "Right Kidney", "Right Lung", "Right Mandible", "Right Parotid", "Right Temporal Lobe", "Small Bowel",
    "Spinal Cord", "Spleen", "Stomach", "Tooth", "Trachea",
})
SLAKE_DETECTION_FILE = "detection.json"
SLAKE_MASK_FILE = "mask.png"
SLAKE_MASK_LABELS_FILE = "mask.txt"
SLAKE_IMAGE_FILE = "source.jpg"


class EmptyRegionError(HscrError):
    """The region to corrupt has no pixels (no lesion annotated, or the label filter matched nothing)."""


# ------------------------------------------------------------------------------------------------------------ regions


def _canvas_shape(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(not isinstance(side, (int, np.integer)) or side < 1 for side in size):
        raise ValueError(f"size must be (width, height) in pixels, two positive integers; got {tuple(size)!r}")
    width, height = size
    return int(height), int(width)


def region_mask_from_boxes(size: Sequence[int], boxes: Iterable[Sequence[float]], *, margin: int = 0) -> np.ndarray:
    """bool [H, W] with the pixels covered by any box `[x, y, w, h]` (top-left origin, exclusive end x+w, y+h)
    grown by `margin` pixels on every side and clipped to the image; `size` is `(width, height)`.

    Fractional coordinates cover every pixel the box touches (floor of the start, ceiling of the end). A box that lies
    outside the image adds nothing.
    """
    height, width = _canvas_shape(size)
    if not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be a non-negative integer number of pixels, got {margin!r}")
    region = np.zeros((height, width), dtype=bool)
    for number, box in enumerate(boxes):
        values = list(box) if isinstance(box, (list, tuple, np.ndarray)) else None
        if values is None or len(values) != 4 or not all(
                isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values):
            raise ValueError(f"box {number} must be [x, y, w, h] (four finite numbers), got {box!r}")
        x, y, w, h = (float(v) for v in values)
        if w <= 0 or h <= 0:
            raise ValueError(f"box {number} {list(values)} has a non-positive width or height")
        left = max(math.floor(x) - margin, 0)
        top = max(math.floor(y) - margin, 0)
        right = min(math.ceil(x + w) + margin, width)
        bottom = min(math.ceil(y + h) + margin, height)
        if left < right and top < bottom:
            region[top:bottom, left:right] = True
    return region


def label_values(mask_image: Image.Image | np.ndarray, *, source: str = "mask") -> np.ndarray:
    """The label value of every pixel of a label mask as int [H, W].

    Single-channel masks (L, P, I, I;16) are their values. RGB/RGBA masks store the label as a grey level (SLAKE's
    RGBA masks have R = G = B = label, alpha 255): they must have equal colour channels; alpha is ignored.
    """
    values = np.asarray(mask_image)
    if values.ndim == 3:
        colour = values[..., :3] if values.shape[2] >= 3 else values[..., :1]
        if colour.shape[2] == 3 and not (np.array_equal(colour[..., 0], colour[..., 1])
                                         and np.array_equal(colour[..., 0], colour[..., 2])):
            raise ValueError(f"{source}: colour mask whose R, G and B differ; a label mask stores one label value "
                             f"per pixel (grey level)")
        values = colour[..., 0]
    if values.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D label mask, got an array of shape {values.shape}")
    return values.astype(np.int64)


def region_mask_from_label_mask(mask_image: Image.Image | np.ndarray, values: Iterable[int]) -> np.ndarray:
    """bool [H, W]: the pixels of the label mask whose label value is one of `values` (see `label_values`)."""
    wanted = sorted({int(value) for value in values})
    return np.isin(label_values(mask_image), wanted)


def _read_label_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return label_values(image, source=str(path))
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable mask image ({type(error).__name__}: {error})") from None


def phantom_lesion_region(mask_path: str | os.PathLike, *, lesion_indices: Iterable[int] | None = None) -> np.ndarray:
    """bool [H, W] of the phantom world's lesion pixels: the mask PNG's nonzero pixels, or only those whose value is
    one of `lesion_indices` (1-based, the `index` of the record's `lesions`)."""
    values = _read_label_mask(Path(mask_path))
    if lesion_indices is None:
        return values != 0
    return np.isin(values, sorted({int(index) for index in lesion_indices}))


@dataclass(frozen=True)
class LesionRegion:
    """A lesion region with where it came from: `source` "mask.png", "detection.json" or both joined by "+";
    `labels` the lesion labels it covers (sorted); `note` a sentence when a fallback was taken, else None."""

    mask: np.ndarray  # bool [H, W]
    source: str
    labels: tuple[str, ...]
    note: str | None = None

    @property
    def num_pixels(self) -> int:
        return int(self.mask.sum())


def read_slake_mask_labels(path: str | os.PathLike) -> dict[int, str]:
    """SLAKE's `mask.txt` (`245:Lung Cancer` per line) as {pixel value: label}; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SLAKE mask label file not found")
    labels: dict[int, str] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        value, separator, label = line.partition(":")
        if not separator or not value.strip().isdigit() or not label.strip():
            raise ValueError(f"{path}:{line_number}: expected 'VALUE:Label' (e.g. '245:Lung Cancer'), got {line!r}")
        labels[int(value)] = label.strip()
    return labels


def read_slake_detection(path: str | os.PathLike) -> list[tuple[str, list[float]]]:
    """SLAKE's `detection.json` (`[{"Lung Cancer": [x, y, w, h]}, ...]`) as [(label, box), ...] in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SLAKE detection file not found")
    entries = read_json_file(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{label: [x, y, w, h]}} objects, got "
                         f"{type(entries).__name__}")
    boxes = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"{path}: entry {number} must be an object {{label: [x, y, w, h]}}, got {entry!r}")
        for label, box in entry.items():
            if not isinstance(box, list) or len(box) != 4:
                raise ValueError(f"{path}: entry {number} ({label!r}) box must be [x, y, w, h], got {box!r}")
            boxes.append((label.strip(), box))
    return boxes


def _find_mask_labels_file(image_dir: Path) -> Path | None:
    """SLAKE ships one `mask.txt` at its root, two levels above `imgs/xmlabN/`; a copy beside the image also works."""
    for folder in (image_dir, image_dir.parent, image_dir.parent.parent):
        candidate = folder / SLAKE_MASK_LABELS_FILE
        if candidate.is_file():
            return candidate
    return None


def _is_lesion_label(label: str, wanted: set[str] | None) -> bool:
    if wanted is not None:
        return label.casefold() in wanted
    return label not in SLAKE_ORGAN_LABELS


def slake_lesion_region(image_dir: str | os.PathLike, *, labels: Iterable[str] | None = None,
                        size: Sequence[int] | None = None, mask_labels: str | os.PathLike | None = None,
                        margin: int = 0) -> LesionRegion:
    """The lesion region of one SLAKE image folder (`imgs/xmlabN/`), from `mask.png` where it is a label mask and
    from `detection.json` boxes otherwise.

    labels: the labels that count as lesions (case-insensitive); default every label not in `SLAKE_ORGAN_LABELS`.
    size: `(width, height)` of the canvas for boxes; default the size of `source.jpg` (or of `mask.png`).
    mask_labels: path of `mask.txt`; default looked up in the folder, its parent and grandparent (SLAKE's root).
    margin: pixels added around every box (not around mask pixels).

    Per selected label, the mask's pixels are used when the mask is a valid label mask (every value is 0 or listed in
    `mask.txt`) that holds that label; otherwise the label's boxes. Raises `FileNotFoundError` when the folder has
    neither file and `EmptyRegionError` when no lesion label is present (the message lists the labels found).
    """
    image_dir = Path(image_dir)
    wanted = None if labels is None else {label.strip().casefold() for label in labels}
    detection_path, mask_path = image_dir / SLAKE_DETECTION_FILE, image_dir / SLAKE_MASK_FILE
    if not detection_path.is_file() and not mask_path.is_file():
        raise FileNotFoundError(f"{image_dir}: no {SLAKE_DETECTION_FILE} or {SLAKE_MASK_FILE}; not a SLAKE image "
                                f"folder (expected imgs/xmlabN/ of the SLAKE release)")
    boxes = read_slake_detection(detection_path) if detection_path.is_file() else []

    notes = []
    mask_values: np.ndarray | None = None
    value_of_label: dict[str, int] = {}
    if mask_path.is_file():
        labels_file = Path(mask_labels) if mask_labels is not None else _find_mask_labels_file(image_dir)
        if labels_file is None:
            notes.append(f"{mask_path} ignored: no {SLAKE_MASK_LABELS_FILE} found in {image_dir} or the two folders "
                         f"above it (pass mask_labels=)")
        else:
            label_of_value = read_slake_mask_labels(labels_file)
            try:
                values = _read_label_mask(mask_path)
            except ValueError as error:  # e.g. a colour scan saved as mask.png; the message names the file
                values, problem = None, str(error)
            else:
                unknown = sorted(set(np.unique(values).tolist()) - set(label_of_value) - {0})
                problem = (f"{mask_path}: values {unknown[:5]}{'...' if len(unknown) > 5 else ''} are not in "
                           f"{labels_file}, so it is an image, not a label mask") if unknown else None
            if problem is None:
                mask_values = values
                present = set(np.unique(values).tolist()) - {0}
                value_of_label = {label_of_value[value]: value for value in present}
            else:
                notes.append(f"{problem}; lesions taken from {SLAKE_DETECTION_FILE} boxes")

    found = sorted({label for label, _ in boxes} | set(value_of_label))
    selected = [label for label in found if _is_lesion_label(label, wanted)]
    if not selected:
        what = "the requested labels" if wanted is not None else "a lesion label (all are normal organs)"
        raise EmptyRegionError(f"{image_dir}: no lesion annotated: found {found or 'no labels'}, none is {what}")

    if mask_values is not None:
        canvas = (mask_values.shape[1], mask_values.shape[0])
    elif size is not None:
        canvas = tuple(size)
    else:
        canvas = _slake_image_size(image_dir)
    if mask_values is not None and size is not None and tuple(size) != canvas:
        notes.append(f"{mask_path} is {canvas[0]}x{canvas[1]}, the image {size[0]}x{size[1]}; region kept at the "
                     f"mask's size (corrupt_region resizes it)")
    region = np.zeros((canvas[1], canvas[0]), dtype=bool)
    sources = set()
    for label in selected:
        if label in value_of_label:
            region |= mask_values == value_of_label[label]
            sources.add(SLAKE_MASK_FILE)
        else:
            region |= region_mask_from_boxes(canvas, [box for name, box in boxes if name == label], margin=margin)
            sources.add(SLAKE_DETECTION_FILE)
    if not region.any():
        raise EmptyRegionError(f"{image_dir}: lesion labels {selected} cover no pixel of the {canvas[0]}x{canvas[1]} "
                               f"image")
    return LesionRegion(mask=region, source="+".join(sorted(sources, reverse=True)), labels=tuple(selected),
                        note="; ".join(notes) or None)


def _slake_image_size(image_dir: Path) -> tuple[int, int]:
    image_path = image_dir / SLAKE_IMAGE_FILE
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_dir}: no {SLAKE_IMAGE_FILE} to size the {SLAKE_DETECTION_FILE} boxes "
                                f"against; pass size=(width, height)")
    with Image.open(image_path) as image:
        return image.size


# --------------------------------------------------------------------------------------------------------- corruption


@dataclass(frozen=True)
class RegionCorruption:
    """A corrupted image with the numbers that made it: `fill_mean` the per-channel mean of `replace` (None for
    `add`), `sigma` the noise standard deviation used, `region_resized_from` the region's `(width, height)` when it
    had to be resized to the image (else None)."""

    image: Image.Image
    mode: str
    sigma: float
    fill_mean: tuple[float, float, float] | None
    seed: int
    region_pixels: int
    region_resized_from: tuple[int, int] | None


def fit_region(region: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[int, int] | None]:
    """`region` as bool [H, W] for an image of `size` (width, height): resized by nearest neighbour when its shape
    differs (returning its original (width, height) as the second value, else None)."""
    region = np.asarray(region)
    if region.ndim != 2:
        raise ValueError(f"region must be a 2-D [H, W] array, got shape {region.shape}")
    if region.dtype != bool:
        if not np.issubdtype(region.dtype, np.number):
            raise ValueError(f"region must be a bool (or 0/1 numeric) array, got dtype {region.dtype}")
        region = region != 0
    height, width = _canvas_shape(size)
    if region.shape == (height, width):
        return region, None
    original = (region.shape[1], region.shape[0])
    resized = Image.fromarray(region.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127, original


def _outside_statistics(pixels: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, float]:
    outside = pixels[~region]  # [N, 3]
    if outside.shape[0] == 0:
        raise EmptyRegionError("the region covers every pixel, so there are no outside statistics to take the noise "
                               "mean and sigma from; pass fill_mean and sigma explicitly")
    return outside.mean(axis=0), float(outside.std(axis=0).mean())


def _channel_means(fill_mean: float | Sequence[float]) -> np.ndarray:
    means = np.atleast_1d(np.asarray(fill_mean, dtype=np.float64))
    if means.shape not in ((1,), (3,)) or not np.isfinite(means).all():
        raise ValueError(f"fill_mean must be one finite number or one per RGB channel, got {fill_mean!r}")
    return np.broadcast_to(means, (3,))


def apply_region_noise(image: Image.Image, region: np.ndarray, *, mode: str = "replace", sigma: float | None = None,
                       seed: int, fill_mean: float | Sequence[float] | None = None) -> RegionCorruption:
    """`corrupt_region` with the resolved noise parameters returned alongside the image (see the module docstring).

    sigma: noise standard deviation in 8-bit levels; None = the image's mean per-channel standard deviation outside the
    region. fill_mean (`replace` only): the noise mean, one value or one per channel; None = the image's per-channel
    mean outside the region.
    """
    if mode not in CORRUPTION_MODES:
        raise ValueError(f"unknown corruption mode {mode!r}; expected one of {CORRUPTION_MODES}")
    if fill_mean is not None and mode != "replace":
        raise ValueError("fill_mean applies to mode 'replace' only (mode 'add' keeps the pixels' own values)")
    if sigma is not None and (not math.isfinite(sigma) or sigma < 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rgb = to_rgb(image)
    region, resized_from = fit_region(region, rgb.size)
    if resized_from is not None:
        logger.warning("lesion region is %dx%d but the image is %dx%d: region resized to the image (nearest neighbour)",
                       *resized_from, *rgb.size)
    region_pixels = int(region.sum())
    if region_pixels == 0:
        raise EmptyRegionError("the region to corrupt is empty (no lesion pixel): nothing to corrupt")

    pixels = np.asarray(rgb)
    need_statistics = sigma is None or (mode == "replace" and fill_mean is None)
    outside_mean, outside_std = _outside_statistics(pixels, region) if need_statistics else (None, None)
    sigma = float(outside_std if sigma is None else sigma)
    # One draw per region pixel in row-major order, shared by the channels (a grey scan stays grey).
    noise = np.random.default_rng(int(seed)).standard_normal(region_pixels)[:, None] * sigma
    if mode == "replace":
        mean = outside_mean if fill_mean is None else _channel_means(fill_mean)
        values = mean[None, :] + noise
        fill = tuple(float(m) for m in mean)
    else:
        values = pixels[region].astype(np.float64) + noise
        fill = None
    corrupted = pixels.copy()
    corrupted[region] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return RegionCorruption(image=Image.fromarray(corrupted, mode="RGB"), mode=mode, sigma=sigma, fill_mean=fill,
                            seed=int(seed), region_pixels=region_pixels, region_resized_from=resized_from)


def corrupt_region(image: Image.Image, region: np.ndarray, *, mode: str = "replace", sigma: float | None = None,
                   seed: int, fill_mean: float | Sequence[float] | None = None) -> Image.Image:
    """`image` (converted to RGB) with Gaussian noise in `region` (bool [H, W]): `replace` puts N(fill_mean, σ²)
    there, `add` adds N(0, σ²); every pixel outside the region is unchanged. Deterministic in `seed`."""
    return apply_region_noise(image, region, mode=mode, sigma=sigma, seed=seed, fill_mean=fill_mean).image
