"""Procedural "phantom" Med-VQA data: synthetic chest scans with 0–2 lesions, a clinical history that usually (not
always) gives the findings away, and questions whose true answer always follows from the image.

Why it exists: HSCR is meant for a vision-language model that leans on text priors over the image. The demo world must
contain that failure, generated from nothing, offline, in seconds, with every answer checkable against the pixels.

**The text prior (the world's misalignment mechanism).** Every question comes with a one-line clinical history
("History: follow-up of a known nodule in the right upper lobe."), which names a *suspected* set of lesion locations
(or none: "History: routine screening, no chest complaints."). The history never names sizes. How often it is right
depends on the split (`HISTORY_AGREEMENT`):
- `train`: it names the true locations 80% of the time and another location set otherwise, so a model can score well
  by reading the history and skipping the image — the shortcut an SFT model takes first;
- `val` (learning-rate selection): half and half;
- `test`: every test image is asked the same questions twice, once under a history that agrees with it (record field
  `prior: "agrees"`) and once under one that conflicts (`prior: "conflicts"`), so the two halves differ in nothing but
  the history. A model that reads the image scores the same on both; one that follows the history fails the second.
Ground truth always comes from the image. Sizes, which no history names, need the image in every split.

Conventions (every answer and every mask follows them):
- **Left/right are the patient's sides, shown in the radiological convention**: the patient's RIGHT lung appears on the
  image's LEFT half (x < image_size / 2), as on a frontal chest X-ray and as in SLAKE, whose "Left Lung" boxes sit on
  the image's right half.
- **Simplified lobes**: each lung is split into an upper and a lower lobe by a horizontal fissure (drawn faintly).
  Real anatomy has an oblique fissure and a right middle lobe; the phantom ignores both. The fissure always lies in the
  band `FISSURE_BAND` (fractions of the image height) and every lesion clears the whole band, so "upper" means
  "entirely above the band" and "lower" "entirely below it".
- **Lesions**: bright, round to mildly irregular blobs, 0–2 per image, each in a different lobe (so two lesions never
  touch), each `small` or `large`; at the default 84 px a small lesion spans 5–7 px and a large one 10–13 px, so with
  14-px ViT patches (6×6 = 36 patches) every lesion lies inside 1–4 patches.
- **Canonical order**: lesions are listed, indexed (mask value 1, 2) and named in answers right before left, upper
  before lower. Lesion `bbox` is `[x, y, w, h]` in pixels, top-left origin, the exact extent of its mask pixels (SLAKE's
  detection.json convention); `center` is `[x, y]` with pixel centres at integer coordinates.
- **Answers**: closed questions are answered "yes"/"no"; counts as digits ("0", "1", "2"); locations as
  "right upper lobe" (two lesions: "right upper lobe and left lower lobe"); sides as "right lung"/"left lung"/"both
  lungs"; sizes as "small"/"large"; descriptions as a short report, one sentence per finding ("A small lesion in the
  right upper lobe. A large lesion in the left lower lobe."; "No lesion is seen." for a normal scan). Each question
  type has a few paraphrased question templates but exactly one canonical answer. Report questions carry the image's
  structured findings (field `findings`: the lesion locations, "right upper lobe", ...), against which a generated
  report's hallucinated and missed findings are counted.

Determinism: image `index` of split `split` is rendered from `numpy.random.SeedSequence([seed, split_id, index])`,
which spawns one generator for the pixels, one for the questions and one for the history (so changing
`questions_per_image` never changes an image, and the history never changes the questions). PNG bytes and JSON bytes
are identical across runs for the same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from hscr_fast.runtime.io import atomic_directory

DEFAULT_IMAGE_SIZE = 84  # 6×6 patches at the CLIP patch size 14
MIN_IMAGE_SIZE = 56  # below this a small lesion is ~2 px across
SIDES = ("right", "left")  # canonical order: patient's right first
LOBES = ("upper", "lower")
SIZES = ("small", "large")
LESION_COUNT_PROBABILITIES = (1 / 3, 1 / 3, 1 / 3)  # P(0), P(1), P(2): count answers are balanced
MAX_QUESTIONS_PER_IMAGE = 12

# Geometry as fractions of the image side (pixel values at 84 px in comments).
LESION_RADIUS = {"small": (0.031, 0.040), "large": (0.0615, 0.0695)}  # 2.6–3.4 px, 5.2–5.8 px
# Max relative radius wobble. A large lesion reaches ≤ 6.45 px from its centre, so it covers ≤ 13 pixels across and
# never more than 2 patches per axis at 84 px.
LESION_IRREGULARITY = {"small": 0.06, "large": 0.10}
LESION_CLEARANCE = 0.015  # gap kept between a lesion and the lung edge / fissure band (1.3 px)
FISSURE_BAND = (0.455, 0.485)  # every lung's fissure lies in this band of image heights
_LUNG_CENTER_X_OFFSET = 0.215  # lung centres at 0.5 ∓ this
_LUNG_CENTER_Y = 0.47
_LUNG_SEMI_AXES = (0.165, 0.33)  # (x, y): 13.9 × 27.7 px
_LUNG_BASE_WIDENING = 0.3

PHANTOM_VERSION = 2  # bump whenever rendering or questions change: it is part of the dataset fingerprint
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}
# P(history names the true lesion locations) per split; "test" asks every question under both (see the docstring).
# Chosen before any model was trained, as "most of the time" for training, and never tuned afterwards.
HISTORY_AGREEMENT = {"train": 0.8, "val": 0.5}
PRIOR_RELATIONS = ("agrees", "conflicts")


@dataclass(frozen=True)
class Lesion:
    """One rendered lesion; `index` is its value in the mask (1-based, canonical order)."""

    index: int
    side: str
    lobe: str
    size: str
    center: tuple[float, float]
    radius: float
    bbox: tuple[int, int, int, int]

    @property
    def location(self) -> str:
        return f"{self.side} {self.lobe} lobe"

    def to_dict(self) -> dict:
        return {"index": self.index, "side": self.side, "lobe": self.lobe, "size": self.size,
                "center": [round(self.center[0], 2), round(self.center[1], 2)], "radius": round(self.radius, 2),
                "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, record: dict) -> "Lesion":
        return cls(index=int(record["index"]), side=record["side"], lobe=record["lobe"], size=record["size"],
                   center=tuple(record["center"]), radius=float(record["radius"]), bbox=tuple(record["bbox"]))


class PhantomQA(NamedTuple):
    question: str
    answer: str
    answer_type: str  # "CLOSED" | "OPEN"
    question_type: str  # "presence" | "location" | "count" | "size" | "description"


# ----------------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Lung:
    side: str
    center: tuple[float, float]
    semi_axes: tuple[float, float]
    angle: float  # radians; the apex leans towards the midline
    fissure_y: float

    def normalized_radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """≤ 1 inside the lung: an egg shape, an ellipse whose half-width grows linearly downwards (narrow apex, wide
        base). With the widening factor `_LUNG_BASE_WIDENING` ≤ 0.5 the region stays convex, which `_place_lesion`
        relies on."""
        dx, dy = x - self.center[0], y - self.center[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        half_width = self.semi_axes[0] * (1 + _LUNG_BASE_WIDENING * v / self.semi_axes[1])
        return np.sqrt((u / half_width) ** 2 + (v / self.semi_axes[1]) ** 2)


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer ≥ {MIN_IMAGE_SIZE} pixels, got {image_size!r}")


def _sample_lungs(rng: np.random.Generator, size: int) -> list[_Lung]:
    lungs = []
    for side, direction in (("right", -1.0), ("left", 1.0)):  # patient's right lung on the image's left
        scale = rng.uniform(0.95, 1.05, size=2)
        center = (size * (0.5 + direction * _LUNG_CENTER_X_OFFSET + rng.uniform(-0.008, 0.008)),
                  size * (_LUNG_CENTER_Y + rng.uniform(-0.01, 0.01)))
        lungs.append(_Lung(side=side, center=center,
                           semi_axes=(size * _LUNG_SEMI_AXES[0] * scale[0], size * _LUNG_SEMI_AXES[1] * scale[1]),
                           angle=-direction * np.deg2rad(rng.uniform(2.0, 7.0)),
                           fissure_y=size * rng.uniform(*FISSURE_BAND)))
    return lungs


def _sample_findings(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """0–2 (side, lobe, size) findings in distinct lobes, in canonical order."""
    count = int(rng.choice(3, p=LESION_COUNT_PROBABILITIES))
    lobes = [(side, lobe) for side in SIDES for lobe in LOBES]
    chosen = sorted(rng.choice(len(lobes), size=count, replace=False).tolist())
    return [(*lobes[i], SIZES[int(rng.integers(2))]) for i in chosen]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean low-frequency texture: a cells×cells Gaussian grid, bilinearly upsampled (two small matmuls)."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    positions = np.linspace(0, cells - 1, size, dtype=np.float32)
    lower = np.clip(np.floor(positions).astype(int), 0, cells - 2)
    weight = positions - lower
    interp = np.zeros((size, cells), dtype=np.float32)
    interp[np.arange(size), lower] = 1 - weight
    interp[np.arange(size), lower + 1] = weight
    return interp @ grid @ interp.T


def _render_anatomy(rng: np.random.Generator, size: int, lungs: list[_Lung], x: np.ndarray, y: np.ndarray
                    ) -> np.ndarray:
    """Body, spine, heart, ribs and air-filled lungs as float intensities (dark = air, bright = dense)."""
    midline = size * (0.5 + rng.uniform(-0.01, 0.01))
    # The thorax: an ellipse from the shoulders (top) to beyond the bottom edge (abdomen).
    body_axes = size * np.array([0.48, 0.60]) * rng.uniform(0.97, 1.03, size=2)
    body_r = np.sqrt(((x - midline) / body_axes[0]) ** 2 + ((y - size * 0.62) / body_axes[1]) ** 2)
    body = body_r <= 1
    # Soft tissue is thinner (darker) towards the edges of the body, like a real radiograph.
    image = np.where(body, 0.40 + 0.12 * np.sqrt(np.clip(1 - body_r ** 2, 0, 1)), 0.03).astype(np.float32)

    spine = np.exp(-(((x - midline) / (0.045 * size)) ** 4)) * (y > 0.08 * size)
    heart_center = (midline + 0.04 * size, size * rng.uniform(0.64, 0.68))
    heart = (((x - heart_center[0]) / (0.15 * size)) ** 2 + ((y - heart_center[1]) / (0.13 * size)) ** 2) <= 1
    image = image + 0.18 * spine * body + 0.14 * heart

    # Posterior ribs: faint arcs that droop laterally, on both sides of the spine; fainter through the lungs.
    ribs = np.zeros_like(image)
    lateral = np.abs(x - midline) / size
    for rib in range(7):
        level = size * (0.15 + 0.095 * rib + rng.uniform(-0.01, 0.01))
        centerline = level + size * (0.55 * lateral ** 2 + 0.06 * lateral)
        ribs += np.exp(-(((y - centerline) / (0.012 * size)) ** 2))
    ribs *= (lateral > 0.05) * body

    lung_texture = _smooth_noise(rng, size, 7)
    for lung in lungs:
        r = lung.normalized_radius(x, y)
        inside = r <= 1
        hilum = np.exp(-(((x - (lung.center[0] + 0.5 * (midline - lung.center[0]))) / (0.08 * size)) ** 2))
        air = 0.13 + 0.06 * r ** 4 + 0.05 * hilum + 0.035 * lung_texture
        fissure = np.abs(y - lung.fissure_y) < 0.5
        image = np.where(inside, air + 0.05 * fissure, image)
    return _soften(image + np.where(image < 0.3, 0.035, 0.07) * ribs)


def _soften(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur: radiographs have no razor-sharp organ borders."""
    for axis in (0, 1):
        padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        first, middle, last = (np.take(padded, range(k, k + image.shape[axis]), axis=axis) for k in range(3))
        image = (first + 2 * middle + last) / 4
    return image


def _lesion_radius_profile(rng: np.random.Generator, radius: float, irregularity: float):
    """r(θ) = R·(1 + Σ_k ε_k cos(kθ + φ_k)), k = 2..4, Σ|ε_k| ≤ irregularity: round to mildly lobulated."""
    amplitudes = rng.uniform(size=3)
    amplitudes *= irregularity * rng.uniform(0.3, 1.0) / amplitudes.sum()
    phases = rng.uniform(0, 2 * np.pi, size=3)
    harmonics = np.arange(2, 5)

    def radius_at(theta: np.ndarray) -> np.ndarray:
        wobble = (amplitudes[:, None] * np.cos(harmonics[:, None] * theta.reshape(1, -1) + phases[:, None])).sum(0)
        return radius * (1 + wobble.reshape(theta.shape))

    return radius_at


def _place_lesion(rng: np.random.Generator, lung: _Lung, lobe: str, max_radius: float, size: int) -> np.ndarray:
    """A centre [x, y] such that the disc of `max_radius` + clearance lies inside the lung and clears the fissure band.

    Rejection sampling in batches: the disc is tested through 32 points on its rim against the (convex) ellipse, which
    is exact up to cos(π/32) ≈ 0.995 of the clearance.
    """
    reach = max_radius + LESION_CLEARANCE * size
    band_top, band_bottom = size * FISSURE_BAND[0], size * FISSURE_BAND[1]
    half_width = lung.semi_axes[0] * (1 + _LUNG_BASE_WIDENING) + 1
    if lobe == "upper":
        y_range = (lung.center[1] - lung.semi_axes[1], band_top - reach)
    else:
        y_range = (band_bottom + reach, lung.center[1] + lung.semi_axes[1])
    rim = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    rim_dx, rim_dy = reach * np.cos(rim), reach * np.sin(rim)
    for _ in range(50):
        cx = rng.uniform(lung.center[0] - half_width, lung.center[0] + half_width, size=64)
        cy = rng.uniform(*y_range, size=64)
        inside = (lung.normalized_radius(cx[:, None] + rim_dx, cy[:, None] + rim_dy) <= 1).all(axis=1)
        if inside.any():
            first = int(np.argmax(inside))
            return np.array([cx[first], cy[first]])
    raise RuntimeError(f"could not place a lesion of radius {max_radius:.1f} px in the {lung.side} {lobe} lobe of a "
                       f"{size}-px phantom; lung semi-axes {lung.semi_axes}")


def render_phantom(rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE
                   ) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Render one scan: (image uint8 [H, W, 3] grey as RGB, mask uint8 [H, W] with lesion index or 0, lesions)."""
    _check_image_size(image_size)
    size = int(image_size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    lungs = {lung.side: lung for lung in _sample_lungs(rng, size)}
    findings = _sample_findings(rng)
    image = _render_anatomy(rng, size, list(lungs.values()), x, y)

    mask = np.zeros((size, size), dtype=np.uint8)
    lesions = []
    for index, (side, lobe, lesion_size) in enumerate(findings, start=1):
        radius = size * rng.uniform(*LESION_RADIUS[lesion_size])
        irregularity = LESION_IRREGULARITY[lesion_size]
        radius_at = _lesion_radius_profile(rng, radius, irregularity)
        center = _place_lesion(rng, lungs[side], lobe, radius * (1 + irregularity), size)
        dx, dy = x - center[0], y - center[1]
        relative = np.hypot(dx, dy) / radius_at(np.arctan2(dy, dx))
        inside = relative <= 1
        # Denser centre, slightly mottled; the lesion replaces the lung so its contrast does not depend on the ribs.
        density = rng.uniform(0.62, 0.74) * (0.8 + 0.2 * np.sqrt(np.clip(1 - relative ** 2, 0, 1))) \
            + 0.025 * rng.normal(size=relative.shape)
        image = np.where(inside, density, image)
        mask[inside] = index
        rows, cols = np.nonzero(inside)
        bbox = (int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1))
        lesions.append(Lesion(index=index, side=side, lobe=lobe, size=lesion_size,
                              center=(float(center[0]), float(center[1])), radius=float(radius), bbox=bbox))

    image = _acquire(rng, image)
    return np.repeat(image[:, :, None], 3, axis=2), mask, lesions


def _acquire(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-image exposure (gamma, gain, offset) and sensor noise, so global statistics do not reveal the findings."""
    gamma = rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(-0.07, 0.07)
    noisy = gain * np.clip(image, 0, 1) ** gamma + offset + rng.uniform(0.01, 0.03) * rng.normal(size=image.shape)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------- questions

_PRESENCE_ANY = ("Is there a lesion?", "Is a lesion present?", "Are there any lesions?", "Is any lesion visible?")
_PRESENCE_NONE = ("Is this scan normal?", "Are both lungs clear?", "Is the chest free of lesions?")
_SIDE_HAS = ("Is there a lesion in the {side} lung?", "Does the {side} lung contain a lesion?",
             "Is the {side} lung affected?")
_SIDE_CLEAR = ("Is the {side} lung clear?",)
_LOBE_HAS = ("Is there a lesion in the {side} {lobe} lobe?", "Is the {lobe} lobe of the {side} lung affected?",
             "Does the {side} {lobe} lobe contain a lesion?")
_SINGLE_SIDE = ("Is the lesion in the {side} lung?", "Is the lesion on the {side} side?")
_SINGLE_LOBE = ("Is the lesion in the {lobe} lobe?",)
_COUNT_CLAIMS = ((("Are there no lesions?",), lambda n: n == 0),
                 (("Is there only one lesion?", "Is there exactly one lesion?"), lambda n: n == 1),
                 (("Are there two lesions?",), lambda n: n == 2),
                 (("Is there more than one lesion?",), lambda n: n > 1))
_SINGLE_SIZE = ("Is the lesion {size}?", "Is it a {size} lesion?")
_ANY_SIZE = ("Is there a {size} lesion?",)
_LOCATED_SIZE = ("Is the lesion in the {side} {lobe} lobe {size}?",)
_WHERE_ONE = ("Where is the lesion?", "Where is the lesion located?", "What is the location of the lesion?")
_WHERE_TWO = ("Where are the lesions?", "Where are the lesions located?", "What are the locations of the lesions?")
_WHICH_LUNG = ("Which lung is affected?", "Which lung has a lesion?", "Which side is abnormal?")
_HOW_MANY = ("How many lesions are there?", "How many lesions are seen?", "How many lesions are visible?",
             "What is the number of lesions?")
_WHAT_SIZE_ONE = ("What size is the lesion?", "How big is the lesion?", "What is the size of the lesion?")
_WHAT_SIZE_AT = ("What size is the lesion in the {side} {lobe} lobe?",
                 "How big is the lesion in the {side} {lobe} lobe?")
_DESCRIBE = ("Describe the image.", "What does this scan show?", "Summarize the findings.",
             "Describe the findings in the lungs.")

# How often each (question_type, answer_type) slot is drawn: about half the questions are closed, as in VQA-RAD, and
# reports (the description slot) are the most frequent open kind, so every split has enough of them to count
# hallucinated findings.
_SLOT_WEIGHTS = {("presence", "CLOSED"): 1.0, ("location", "CLOSED"): 1.0, ("count", "CLOSED"): 0.5,
                 ("size", "CLOSED"): 0.75, ("location", "OPEN"): 1.0, ("count", "OPEN"): 0.75,
                 ("size", "OPEN"): 0.75, ("description", "OPEN"): 1.5}

Finding = tuple[str, str, str]  # (side, lobe, size)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def describe(findings: Sequence[Finding]) -> str:
    """The canonical report: one sentence per finding in canonical order, or "No lesion is seen." """
    if not findings:
        return "No lesion is seen."
    return " ".join(f"A {size} lesion in the {side} {lobe} lobe." for side, lobe, size in findings)


def finding_names(findings: Sequence[Finding]) -> list[str]:
    """The structured findings of a report question: each lesion's location ("right upper lobe"), canonical order.

    Findings are named by location only: a report that puts a lesion in a lobe where there is none hallucinates a
    finding; a wrong size on a real lesion is an attribute error, which the open-recall score already counts."""
    return [f"{side} {lobe} lobe" for side, lobe, _ in findings]


# -- clinical history: the text prior ----------------------------------------------------------------------------------

Location = tuple[str, str]  # (side, lobe)
_HISTORY_NONE = ("History: routine screening, no chest complaints.", "History: pre-operative check, no symptoms.")
_HISTORY_ONE = ("History: follow-up of a known nodule in the {0} {1} lobe.",
                "History: earlier scan showed a lesion in the {0} {1} lobe.")
_HISTORY_TWO = ("History: follow-up of known nodules in the {0} {1} lobe and the {2} {3} lobe.",
                "History: earlier scan showed lesions in the {0} {1} lobe and the {2} {3} lobe.")


def history_text(locations: Sequence[Location], variant: int) -> str:
    """The history line naming `locations` (canonical order), in paraphrase `variant` (0 or 1)."""
    templates = (_HISTORY_NONE, _HISTORY_ONE, _HISTORY_TWO)[len(locations)]
    return templates[variant % len(templates)].format(*(word for location in locations for word in location))


def _all_location_sets() -> list[tuple[Location, ...]]:
    lobes = [(side, lobe) for side in SIDES for lobe in LOBES]
    return [()] + [(lobe,) for lobe in lobes] + [(lobes[i], lobes[j]) for i in range(4) for j in range(i + 1, 4)]


def draw_history(rng: np.random.Generator, findings: Sequence[Finding], agrees: bool) -> tuple[str, list[Location]]:
    """(history line, the locations it names). Agreeing: the true locations. Conflicting: another location set, drawn
    like the findings themselves (count uniform over 0–2, then distinct lobes uniformly), so a conflicting history
    looks exactly like an agreeing one of another scan."""
    true_locations = tuple((side, lobe) for side, lobe, _ in findings)
    if agrees:
        named = true_locations
    else:
        by_count = [[s for s in _all_location_sets() if len(s) == count and s != true_locations] for count in range(3)]
        count = int(rng.choice(3, p=LESION_COUNT_PROBABILITIES))
        while not by_count[count]:  # only the normal scan has no other 0-lesion set
            count = int(rng.choice(3, p=LESION_COUNT_PROBABILITIES))
        named = by_count[count][int(rng.integers(len(by_count[count])))]
    return history_text(named, int(rng.integers(2))), [list(location) for location in named]


def _closed_candidates(findings: Sequence[Finding]) -> list[PhantomQA]:
    count = len(findings)
    sides_hit = {side for side, _, _ in findings}
    lobes_hit = {(side, lobe) for side, lobe, _ in findings}
    sizes_hit = {size for _, _, size in findings}
    out = []

    def add(templates, answer: bool, question_type: str, **fields):
        out.extend(PhantomQA(t.format(**fields), _yes_no(answer), "CLOSED", question_type) for t in templates)

    add(_PRESENCE_ANY, count > 0, "presence")
    add(_PRESENCE_NONE, count == 0, "presence")
    for side in SIDES:
        add(_SIDE_HAS, side in sides_hit, "location", side=side)
        add(_SIDE_CLEAR, side not in sides_hit, "location", side=side)
        for lobe in LOBES:
            add(_LOBE_HAS, (side, lobe) in lobes_hit, "location", side=side, lobe=lobe)
    if count == 1:
        (side_hit, lobe_hit, _), = findings
        for side in SIDES:
            add(_SINGLE_SIDE, side == side_hit, "location", side=side)
        for lobe in LOBES:
            add(_SINGLE_LOBE, lobe == lobe_hit, "location", lobe=lobe)
    for templates, holds in _COUNT_CLAIMS:
        add(templates, holds(count), "count")
    if count:
        for size in SIZES:
            add(_ANY_SIZE, size in sizes_hit, "size", size=size)
            if count == 1:
                add(_SINGLE_SIZE, size in sizes_hit, "size", size=size)
            else:
                for side, lobe, actual in findings:
                    add(_LOCATED_SIZE, size == actual, "size", side=side, lobe=lobe, size=size)
    return out


def _open_candidates(findings: Sequence[Finding]) -> list[PhantomQA]:
    count = len(findings)
    out = [PhantomQA(q, str(count), "OPEN", "count") for q in _HOW_MANY]
    out += [PhantomQA(q, describe(findings), "OPEN", "description") for q in _DESCRIBE]
    if not count:
        return out  # where/which/what-size questions presuppose a lesion
    locations = " and ".join(f"{side} {lobe} lobe" for side, lobe, _ in findings)
    out += [PhantomQA(q, locations, "OPEN", "location") for q in (_WHERE_ONE if count == 1 else _WHERE_TWO)]
    sides_hit = {side for side, _, _ in findings}
    lung = "both lungs" if len(sides_hit) == 2 else f"{next(iter(sides_hit))} lung"
    out += [PhantomQA(q, lung, "OPEN", "location") for q in _WHICH_LUNG]
    if count == 1:
        out += [PhantomQA(q, findings[0][2], "OPEN", "size") for q in _WHAT_SIZE_ONE]
    else:
        out += [PhantomQA(q.format(side=side, lobe=lobe), size, "OPEN", "size")
                for side, lobe, size in findings for q in _WHAT_SIZE_AT]
    return out


def candidate_questions(findings: Sequence[Finding]) -> list[PhantomQA]:
    """Every question the generator can ask about an image with these (side, lobe, size) findings, with its answer."""
    return _closed_candidates(findings) + _open_candidates(findings)


def _findings_of(lesions: Sequence[Lesion]) -> list[Finding]:
    findings = [(lesion.side, lesion.lobe, lesion.size) for lesion in lesions]
    for side, lobe, size in findings:
        if side not in SIDES or lobe not in LOBES or size not in SIZES:
            raise ValueError(f"lesion ({side!r}, {lobe!r}, {size!r}) is not one of sides {SIDES}, lobes {LOBES}, "
                             f"sizes {SIZES}")
    if len(findings) > 2 or len({(side, lobe) for side, lobe, _ in findings}) != len(findings):
        raise ValueError(f"a phantom has at most two lesions, in distinct lobes; got {findings}")
    order = {(side, lobe): i for i, (side, lobe) in enumerate((s, lobe) for s in SIDES for lobe in LOBES)}
    return sorted(findings, key=lambda f: order[f[:2]])


def questions_for(lesions: Sequence[Lesion], rng: np.random.Generator, num_questions: int = 4) -> list[PhantomQA]:
    """Draw `num_questions` distinct questions about one image.

    A (question_type, answer_type) slot is drawn by `_SLOT_WEIGHTS` among slots not yet used for this image (all
    slots become available again once each has been used). For a closed slot the answer is drawn first, yes or no with
    probability 1/2, then a question with that answer: every slot offers both answers for every image (via the inverse
    forms "Is the left lung clear?", "Are there no lesions?"...), so closed answers are balanced overall and per slot.
    """
    if not 1 <= num_questions <= MAX_QUESTIONS_PER_IMAGE:
        raise ValueError(f"num_questions must be in 1..{MAX_QUESTIONS_PER_IMAGE}, got {num_questions}")
    by_slot: dict[tuple[str, str], list[PhantomQA]] = {}
    for qa in candidate_questions(_findings_of(lesions)):
        by_slot.setdefault((qa.question_type, qa.answer_type), []).append(qa)
    asked: set[str] = set()
    used_slots: set[tuple[str, str]] = set()
    chosen: list[PhantomQA] = []
    while len(chosen) < num_questions:
        open_slots = [s for s in _SLOT_WEIGHTS if any(qa.question not in asked for qa in by_slot.get(s, ()))]
        fresh = [s for s in open_slots if s not in used_slots]
        if not fresh:
            used_slots.clear()
            fresh = open_slots
        weights = np.array([_SLOT_WEIGHTS[s] for s in fresh])
        slot = fresh[int(rng.choice(len(fresh), p=weights / weights.sum()))]
        used_slots.add(slot)
        pool = [qa for qa in by_slot[slot] if qa.question not in asked]
        if slot[1] == "CLOSED":
            wanted = "yes" if rng.random() < 0.5 else "no"
            pool = [qa for qa in pool if qa.answer == wanted] or pool
        qa = pool[int(rng.integers(len(pool)))]
        asked.add(qa.question)
        chosen.append(qa)
    return chosen


def _all_finding_sets() -> list[list[Finding]]:
    lobes = [(side, lobe) for side in SIDES for lobe in LOBES]
    sets: list[list[Finding]] = [[]]
    sets += [[(*lobe, size)] for lobe in lobes for size in SIZES]
    sets += [[(*lobes[i], size_i), (*lobes[j], size_j)] for i in range(4) for j in range(i + 1, 4)
             for size_i in SIZES for size_j in SIZES]
    return sets


def phantom_corpus() -> list[str]:
    """Every question, answer and history string the generator can produce (sorted, distinct): the demo tokenizer's
    corpus."""
    texts = {text for findings in _all_finding_sets() for qa in candidate_questions(findings)
             for text in (qa.question, qa.answer)}
    texts |= {history_text(locations, variant) for locations in _all_location_sets() for variant in range(2)}
    return sorted(texts)


def phantom_vocabulary() -> list[str]:
    """The distinct words and punctuation marks of `phantom_corpus()` (case kept)."""
    return sorted({token for text in phantom_corpus() for token in re.findall(r"\w+|[^\w\s]", text)})


# ------------------------------------------------------------------------------------------------------------- dataset


def image_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(pixel generator, question generator) for image `index` of `split`."""
    pixels, questions = np.random.SeedSequence([seed, SPLIT_IDS[split], index]).spawn(2)
    return np.random.default_rng(pixels), np.random.default_rng(questions)


def history_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The history generator of image `index` of `split`: the seed sequence's third child, independent of the other
    two (a SeedSequence's children depend only on their index, not on how many are spawned)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]).spawn(3)[2])


@dataclass(frozen=True)
class PhantomPaths:
    root: Path
    train_json: Path
    val_json: Path
    test_json: Path
    image_folder: Path  # records' "image" is relative to this (LLaVA-Med's --image-folder)
    mask_folder: Path  # records' "mask" is relative to this; same file name as the image
    manifest: Path


def _paths(root: Path) -> PhantomPaths:
    return PhantomPaths(root=root, train_json=root / "train.json", val_json=root / "val.json",
                        test_json=root / "test.json",
                        image_folder=root / "images", mask_folder=root / "masks", manifest=root / "manifest.json")


def _write_split(root: Path, split: str, num_images: int, questions_per_image: int, seed: int, image_size: int
                 ) -> list[dict]:
    records = []
    for index in range(num_images):
        pixel_rng, question_rng = image_rngs(seed, split, index)
        histories = history_rng(seed, split, index)
        image, mask, lesions = render_phantom(pixel_rng, image_size)
        name = f"{split}_{index:06d}.png"
        # Level 1: a noisy scan barely compresses further, and it is twice as fast as the default level 6.
        Image.fromarray(image).save(root / "images" / name, compress_level=1)
        Image.fromarray(mask).save(root / "masks" / name, compress_level=1)
        lesion_dicts = [lesion.to_dict() for lesion in lesions]
        findings = _findings_of(lesions)
        if split == "test":  # the same questions under an agreeing and a conflicting history
            relations = PRIOR_RELATIONS
        else:
            relations = ("agrees" if histories.random() < HISTORY_AGREEMENT[split] else "conflicts",)
        questions = questions_for(lesions, question_rng, questions_per_image)
        for relation in relations:
            history, named = draw_history(histories, findings, relation == "agrees")
            suffix = "" if split != "test" else f"-{relation}"
            for number, qa in enumerate(questions):
                record = {
                    "id": f"phantom-{split}-{index:06d}-q{number}{suffix}", "image": name, "mask": name,
                    "conversations": [{"from": "human", "value": f"<image>\n{history} {qa.question}"},
                                      {"from": "gpt", "value": qa.answer}],
                    "answer_type": qa.answer_type, "question_type": qa.question_type,
                    "organ": "chest", "modality": "phantom-xray", "lesions": lesion_dicts,
                    "history_locations": named, "prior": relation}
                if qa.question_type == "description":  # a report: scored for hallucinated and missed findings too
                    record["findings"] = finding_names(findings)
                records.append(record)
    return records


def _summary(records: list[dict]) -> dict:
    slots = Counter(f"{r['question_type']}/{r['answer_type']}" for r in records)
    closed = Counter(r["conversations"][1]["value"] for r in records if r["answer_type"] == "CLOSED")
    prior = Counter(r["prior"] for r in records)
    return {"records": len(records), "slots": dict(sorted(slots.items())),
            "closed_answers": dict(sorted(closed.items())), "prior": dict(sorted(prior.items()))}


def _is_complete(paths: PhantomPaths, fingerprint: dict) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    expected_images = fingerprint["num_train_images"] + fingerprint["num_val_images"] + fingerprint["num_test_images"]
    return (manifest.get("fingerprint") == fingerprint and paths.train_json.is_file() and paths.test_json.is_file()
            and all(folder.is_dir() and len(os.listdir(folder)) == expected_images
                    for folder in (paths.image_folder, paths.mask_folder)))


def build_phantom_dataset(out_dir: str | os.PathLike, *, num_train_images: int = 1200, num_val_images: int = 100,
                          num_test_images: int = 200, questions_per_image: int = 4, seed: int = 0,
                          image_size: int = DEFAULT_IMAGE_SIZE) -> PhantomPaths:
    """Write `train.json`, `val.json`, `test.json` (LLaVA-Med format, one question per record; the test set asks each
    question twice, under an agreeing and a conflicting history), `images/`, `masks/` and `manifest.json` under
    `out_dir`, and return their paths.

    Idempotent: a complete directory whose manifest fingerprint matches the arguments is left untouched. Atomic: the
    dataset is built in a sibling temporary directory and moved into place, so `out_dir` is never half-written. An
    existing `out_dir` is replaced only if it is empty or an earlier phantom dataset (it has a manifest); anything else
    is refused rather than deleted.
    """
    for name, value, low in (("num_train_images", num_train_images, 0), ("num_val_images", num_val_images, 0),
                             ("num_test_images", num_test_images, 0),
                             ("questions_per_image", questions_per_image, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if questions_per_image > MAX_QUESTIONS_PER_IMAGE:
        raise ValueError(f"questions_per_image must be ≤ {MAX_QUESTIONS_PER_IMAGE}, got {questions_per_image}")
    _check_image_size(image_size)
    fingerprint = {"version": PHANTOM_VERSION, "num_train_images": int(num_train_images),
                   "num_val_images": int(num_val_images), "num_test_images": int(num_test_images),
                   "questions_per_image": int(questions_per_image),
                   "seed": int(seed), "image_size": int(image_size)}
    root = Path(out_dir).absolute()
    paths = _paths(root)
    if _is_complete(paths, fingerprint):
        return paths
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not paths.manifest.is_file())):
        raise FileExistsError(f"{root} exists and is not a phantom dataset (no manifest.json); choose another "
                              f"out_dir or remove it")

    with atomic_directory(root) as staging:
        staged = _paths(staging)
        staged.image_folder.mkdir(parents=True)
        staged.mask_folder.mkdir()
        summaries = {}
        for split, count, json_path in (("train", num_train_images, staged.train_json),
                                        ("val", num_val_images, staged.val_json),
                                        ("test", num_test_images, staged.test_json)):
            records = _write_split(staging, split, count, questions_per_image, seed, image_size)
            json_path.write_text(json.dumps(records, indent=1))
            summaries[split] = _summary(records)
        # The manifest is written last: its presence with a matching fingerprint is what "complete" means.
        staged.manifest.write_text(json.dumps({"fingerprint": fingerprint, "splits": summaries}, indent=1))
    return paths


def preview_grid(seed: int = 0, rows: int = 4, cols: int = 6, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """A rows×cols mosaic of training phantoms (uint8 RGB, 2-px separators), for eyeballing the renderer."""
    tiles = [render_phantom(image_rngs(seed, "train", i)[0], image_size)[0] for i in range(rows * cols)]
    pad = 2
    grid = np.full((rows * (image_size + pad) - pad, cols * (image_size + pad) - pad, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = (i // cols) * (image_size + pad), (i % cols) * (image_size + pad)
        grid[top:top + image_size, left:left + image_size] = tile
    return grid


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the procedural phantom Med-VQA dataset (LLaVA-Med format).")
    parser.add_argument("out_dir")
    parser.add_argument("--num-train-images", type=int, default=1200)
    parser.add_argument("--num-val-images", type=int, default=100)
    parser.add_argument("--num-test-images", type=int, default=200)
    parser.add_argument("--questions-per-image", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--preview", metavar="PNG", help="also save a grid of sample images here")
    args = parser.parse_args(None if argv is None else list(argv))
    paths = build_phantom_dataset(args.out_dir, num_train_images=args.num_train_images,
                                  num_val_images=args.num_val_images, num_test_images=args.num_test_images,
                                  questions_per_image=args.questions_per_image,
                                  seed=args.seed, image_size=args.image_size)
    if args.preview:
        Image.fromarray(preview_grid(args.seed, image_size=args.image_size)).save(args.preview)
    print(json.dumps(json.loads(paths.manifest.read_text())["splits"], indent=1))
    print(f"wrote {paths.root}")


if __name__ == "__main__":
    main()
