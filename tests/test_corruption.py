"""Lesion regions and region noise: box geometry against a pixel-by-pixel reference, label masks, exact preservation
outside the region, seeded determinism, the statistics of `replace` and `add`, and SLAKE's real annotations."""
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from hscr_fast.data.images import load_image
from hscr_fast.preferences.corruption import (
    EmptyRegionError,
    apply_region_noise,
    corrupt_region,
    phantom_lesion_region,
    read_slake_mask_labels,
    region_mask_from_boxes,
    region_mask_from_label_mask,
    slake_lesion_region,
)


def boxes_reference(width, height, boxes, margin=0):
    """Pixel (col, row) is in a box when its unit square [col, col+1) x [row, row+1) overlaps the box grown by
    `margin` (the box's interior, so touching an edge does not count)."""
    region = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        for row in range(height):
            for col in range(width):
                if (col + 1 > x - margin and col < x + w + margin and row + 1 > y - margin and row < y + h + margin):
                    region[row, col] = True
    return region


def random_image(rng, width, height):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_region(rng, width, height, fraction=0.3):
    region = rng.random((height, width)) < fraction
    region[0, 0] = True
    return region


# ------------------------------------------------------------------------------------------------------------ regions


def test_box_geometry_top_left_origin_exclusive_end():
    region = region_mask_from_boxes((7, 5), [[2, 1, 3, 2]])  # size is (width, height)
    assert region.shape == (5, 7)
    expected = np.zeros((5, 7), dtype=bool)
    expected[1:3, 2:5] = True  # rows y .. y+h-1, columns x .. x+w-1
    np.testing.assert_array_equal(region, expected)
    single = region_mask_from_boxes((7, 5), [[0, 0, 1, 1]])
    assert single.sum() == 1 and single[0, 0]


@pytest.mark.parametrize("width,height", [(13, 9), (1, 17), (31, 30)])
def test_boxes_match_pixel_reference(width, height):
    rng = np.random.default_rng(width * 100 + height)
    for trial in range(20):
        count = int(rng.integers(1, 4))
        boxes = []
        for _ in range(count):
            x, y = rng.uniform(-3, width + 1), rng.uniform(-3, height + 1)
            w, h = rng.uniform(0.2, width / 2 + 1), rng.uniform(0.2, height / 2 + 1)
            if trial % 2:  # integer boxes, as SLAKE and the phantom write them
                x, y, w, h = float(round(x)), float(round(y)), float(max(1, round(w))), float(max(1, round(h)))
            boxes.append([x, y, w, h])
        margin = int(trial % 3)
        np.testing.assert_array_equal(region_mask_from_boxes((width, height), boxes, margin=margin),
                                      boxes_reference(width, height, boxes, margin), err_msg=f"{boxes} margin {margin}")


def test_boxes_margin_clips_and_outside_boxes_add_nothing():
    region = region_mask_from_boxes((10, 8), [[0, 0, 2, 2]], margin=3)
    expected = np.zeros((8, 10), dtype=bool)
    expected[:5, :5] = True
    np.testing.assert_array_equal(region, expected)
    assert not region_mask_from_boxes((10, 8), [[20, 20, 3, 3]]).any()


@pytest.mark.parametrize("box", [[1, 1, 0, 2], [1, 1, 2, -1], [1, 2, 3], ["a", 1, 2, 2], [1, 1, float("nan"), 2]])
def test_bad_boxes_raise(box):
    with pytest.raises(ValueError, match="box 0"):
        region_mask_from_boxes((10, 10), [box])


def test_bad_size_raises():
    with pytest.raises(ValueError, match="width, height"):
        region_mask_from_boxes((10, 0), [[1, 1, 2, 2]])


def test_label_mask_single_channel_rgba_and_colour():
    values = np.array([[0, 245, 70], [245, 245, 0]], dtype=np.uint8)
    expected = values == 245
    np.testing.assert_array_equal(region_mask_from_label_mask(Image.fromarray(values), [245]), expected)
    rgba = np.dstack([values, values, values, np.full_like(values, 255)])
    np.testing.assert_array_equal(region_mask_from_label_mask(Image.fromarray(rgba, "RGBA"), [245]), expected)
    np.testing.assert_array_equal(region_mask_from_label_mask(values, [70, 245]), values > 0)
    colour = np.dstack([values, values, np.zeros_like(values)])
    with pytest.raises(ValueError, match="R, G and B differ"):
        region_mask_from_label_mask(colour, [245])


def test_phantom_region_and_missing_mask(tmp_path):
    mask = np.zeros((9, 11), dtype=np.uint8)
    mask[2:4, 3:6] = 1
    mask[6, 7] = 2
    Image.fromarray(mask).save(tmp_path / "m.png")
    np.testing.assert_array_equal(phantom_lesion_region(tmp_path / "m.png"), mask > 0)
    np.testing.assert_array_equal(phantom_lesion_region(tmp_path / "m.png", lesion_indices=[2]), mask == 2)
    with pytest.raises(FileNotFoundError, match="nope.png: mask file not found"):
        phantom_lesion_region(tmp_path / "nope.png")


# --------------------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_outside_unchanged_inside_changed_and_deterministic(mode):
    rng = np.random.default_rng(1)
    for width, height in [(37, 23), (64, 65), (5, 90)]:
        image, region = random_image(rng, width, height), random_region(rng, width, height)
        before = np.asarray(image)
        out = np.asarray(corrupt_region(image, region, mode=mode, sigma=40.0, seed=7))
        assert out.dtype == np.uint8 and out.shape == before.shape
        np.testing.assert_array_equal(out[~region], before[~region])  # byte-identical outside
        changed = (out[region] != before[region]).any(axis=1)
        assert changed.mean() > 0.9, f"only {changed.mean():.2f} of the region changed"
        again = np.asarray(corrupt_region(image, region, mode=mode, sigma=40.0, seed=7))
        np.testing.assert_array_equal(out, again)
        other = np.asarray(corrupt_region(image, region, mode=mode, sigma=40.0, seed=8))
        assert not np.array_equal(out, other)
        np.testing.assert_array_equal(np.asarray(image), before)  # the input is not modified


def test_replace_is_independent_of_the_region_content():
    rng = np.random.default_rng(2)
    image = np.asarray(random_image(rng, 80, 70))
    region = random_region(rng, 80, 70, fraction=0.4)
    other = image.copy()
    other[region] = rng.integers(0, 256, (int(region.sum()), 3), dtype=np.uint8)  # differs only inside the region
    first = np.asarray(corrupt_region(Image.fromarray(image), region, mode="replace", seed=3))
    second = np.asarray(corrupt_region(Image.fromarray(other), region, mode="replace", seed=3))
    np.testing.assert_array_equal(first, second)


def test_replace_statistics_explicit_and_from_image():
    rng = np.random.default_rng(4)
    height, width = 120, 150
    base = rng.normal([90, 100, 110], 25, (height, width, 3))
    image = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    region = np.zeros((height, width), dtype=bool)
    region[20:100, 30:130] = True  # 8000 pixels
    inside = np.asarray(corrupt_region(Image.fromarray(image), region, mode="replace", sigma=20.0, fill_mean=127.5,
                                       seed=5))[region].astype(float)
    assert abs(inside.mean() - 127.5) < 1.0
    assert abs(inside[:, 0].std() - 20.0) < 0.6
    correlation = np.corrcoef(inside[:, 0], image[region][:, 0].astype(float))[0, 1]
    assert abs(correlation) < 0.05

    result = apply_region_noise(Image.fromarray(image), region, mode="replace", seed=5)
    outside = image[~region].astype(float)
    np.testing.assert_allclose(result.fill_mean, outside.mean(axis=0))
    assert result.sigma == pytest.approx(outside.std(axis=0).mean())
    values = np.asarray(result.image)[region].astype(float)
    np.testing.assert_allclose(values.mean(axis=0), outside.mean(axis=0), atol=1.5)
    assert abs(values[:, 1].std() - result.sigma) < 0.05 * result.sigma
    assert result.region_pixels == 8000 and result.region_resized_from is None


def test_add_is_original_plus_noise_of_sigma():
    rng = np.random.default_rng(6)
    grey = np.clip(np.rint(128 + rng.normal(0, 15, (101, 99))), 0, 255).astype(np.uint8)
    image = np.dstack([grey] * 3)
    region = random_region(rng, 99, 101, fraction=0.8)
    sigma = 12.0
    out = np.asarray(corrupt_region(Image.fromarray(image), region, mode="add", sigma=sigma, seed=9))
    difference = out[region].astype(float) - image[region].astype(float)
    assert (out[region] > 0).all() and (out[region] < 255).all()  # mid-grey: no clipping, the noise is seen whole
    assert abs(difference.mean()) < 0.5
    # rounding to integers adds variance 1/12
    assert abs(difference[:, 0].std() - np.sqrt(sigma ** 2 + 1 / 12)) < 0.25
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # one draw shared by the channels: grey stays grey
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert np.corrcoef(out[region][:, 0].astype(float), image[region][:, 0].astype(float))[0, 1] > 0.6


def test_add_clips_to_the_8bit_range():
    image = Image.new("RGB", (40, 30), (250, 250, 250))
    region = np.ones((30, 40), dtype=bool)
    region[0] = False
    out = np.asarray(corrupt_region(image, region, mode="add", sigma=60.0, seed=1))
    assert out[region].max() == 255 and out[region].min() < 200
    assert (out[0] == 250).all()


def test_region_resized_to_the_image_with_a_warning(caplog):
    rng = np.random.default_rng(3)
    image = random_image(rng, 40, 20)
    small = np.zeros((10, 20), dtype=bool)
    small[2:5, 4:9] = True
    with caplog.at_level(logging.WARNING, logger="hscr_fast.preferences.corruption"):
        result = apply_region_noise(image, small, mode="add", sigma=30.0, seed=2)
    assert "resized" in caplog.text and result.region_resized_from == (20, 10)
    big = np.zeros((20, 40), dtype=bool)
    big[4:10, 8:18] = True  # the nearest-neighbour upscale of `small`
    np.testing.assert_array_equal(np.asarray(result.image),
                                  np.asarray(corrupt_region(image, big, mode="add", sigma=30.0, seed=2)))


def test_bad_input_raises():
    image = Image.new("RGB", (8, 6), (100, 100, 100))
    with pytest.raises(EmptyRegionError, match="empty"):
        corrupt_region(image, np.zeros((6, 8), dtype=bool), seed=0)
    with pytest.raises(EmptyRegionError, match="covers every pixel"):
        corrupt_region(image, np.ones((6, 8), dtype=bool), seed=0)
    everything = corrupt_region(image, np.ones((6, 8), dtype=bool), fill_mean=0, sigma=10.0, seed=0)
    assert np.asarray(everything).mean() < 20  # MMedPO's N(0, 10): near black once clipped
    region = np.zeros((6, 8), dtype=bool)
    region[1, 1] = True
    with pytest.raises(ValueError, match="unknown corruption mode"):
        corrupt_region(image, region, mode="blur", seed=0)
    with pytest.raises(ValueError, match="fill_mean applies to mode 'replace' only"):
        corrupt_region(image, region, mode="add", fill_mean=3, seed=0)
    with pytest.raises(ValueError, match="fill_mean must be one finite number or one per RGB channel"):
        corrupt_region(image, region, fill_mean=[1, 2], seed=0)
    with pytest.raises(ValueError, match="sigma"):
        corrupt_region(image, region, sigma=-1.0, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        corrupt_region(image, np.zeros((6, 8, 3), dtype=bool), seed=0)


# -------------------------------------------------------------------------------------------------------------- SLAKE


def slake_boxes(folder, label=None):
    return [box for entry in json.loads((folder / "detection.json").read_text()) for name, box in entry.items()
            if label is None or name == label]


def test_slake_label_mask_lung_cancer(shared_data):
    folder = shared_data / "slake" / "imgs" / "xmlab102"
    found = slake_lesion_region(folder)
    assert found.source == "mask.png" and found.labels == ("Lung Cancer",) and found.note is None
    labels = read_slake_mask_labels(shared_data / "slake" / "mask.txt")
    value = next(v for v, name in labels.items() if name == "Lung Cancer")
    mask = np.asarray(Image.open(folder / "mask.png"))[..., 0]
    np.testing.assert_array_equal(found.mask, mask == value)
    # the exact mask lies inside, and touches every side of, its detection box
    x, y, w, h = (int(v) for v in slake_boxes(folder, "Lung Cancer")[0])
    rows, cols = np.nonzero(found.mask)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x, y, x + w, y + h)

    image = load_image(folder / "source.jpg")
    out = np.asarray(corrupt_region(image, found.mask, mode="replace", seed=11))
    clean = np.asarray(image)
    np.testing.assert_array_equal(out[~found.mask], clean[~found.mask])
    assert (out[found.mask] != clean[found.mask]).any(axis=1).mean() > 0.9


def test_slake_chest_xray_mask_is_an_image_so_boxes_are_used(shared_data):
    folder = shared_data / "slake" / "imgs" / "xmlab147"
    found = slake_lesion_region(folder)
    assert found.source == "detection.json" and set(found.labels) == {"Atelectasis", "Mass"}
    assert "mask.png" in found.note
    width, height = Image.open(folder / "source.jpg").size
    expected = np.zeros((height, width), dtype=bool)
    for x, y, w, h in slake_boxes(folder):
        expected[int(y):int(y + h), int(x):int(x + w)] = True
    np.testing.assert_array_equal(found.mask, expected)


def test_slake_organ_only_and_label_filter(shared_data):
    folder = shared_data / "slake" / "imgs" / "xmlab13"  # Liver and Spleen only
    with pytest.raises(EmptyRegionError, match="no lesion annotated.*Liver"):
        slake_lesion_region(folder)
    liver = slake_lesion_region(folder, labels=["liver"])
    np.testing.assert_array_equal(liver.mask, np.asarray(Image.open(folder / "mask.png"))[..., 0] == 70)
    brain = slake_lesion_region(shared_data / "slake" / "imgs" / "xmlab41", labels=["Brain Edema"])
    assert brain.source == "detection.json" and brain.labels == ("Brain Edema",)
    x, y, w, h = (int(v) for v in slake_boxes(shared_data / "slake" / "imgs" / "xmlab41", "Brain Edema")[0])
    assert brain.mask.sum() == w * h and brain.mask[y, x] and not brain.mask[y - 1, x]


def test_slake_without_mask_labels_falls_back_to_boxes(shared_data, tmp_path):
    folder = tmp_path / "xmlab102"
    shutil.copytree(shared_data / "slake" / "imgs" / "xmlab102", folder)
    found = slake_lesion_region(folder)
    assert found.source == "detection.json" and "mask.txt" in found.note
    x, y, w, h = (int(v) for v in slake_boxes(folder)[0])
    assert found.mask.sum() == w * h


def test_slake_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no detection.json or mask.png"):
        slake_lesion_region(tmp_path)
    (tmp_path / "detection.json").write_text("[{\"Nodule\": [1, 2]}]")
    with pytest.raises(ValueError, match=r"detection.json: entry 0 \('Nodule'\) box must be"):
        slake_lesion_region(tmp_path, size=(10, 10))
    (tmp_path / "detection.json").write_text("[{\"Nodule\": [1, 2, 3, 4]}]")
    with pytest.raises(FileNotFoundError, match="no source.jpg"):
        slake_lesion_region(tmp_path)
    assert slake_lesion_region(tmp_path, size=(10, 10)).mask.sum() == 12
    (tmp_path / "mask.txt").write_text("245:Lung Cancer\nseventy:Liver\n")
    with pytest.raises(ValueError, match=r"mask.txt:2: expected 'VALUE:Label'"):
        read_slake_mask_labels(tmp_path / "mask.txt")
