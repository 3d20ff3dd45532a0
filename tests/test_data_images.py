"""hscr_fast.data.images: every image mode a Med-VQA set may hold comes back as 8-bit RGB; bad files fail clearly."""
import numpy as np
import pytest
from PIL import Image, ImageFile

from hscr_fast.data.images import ImageLoadError, load_image, to_rgb, validate_image

RNG = np.random.default_rng(0)


def _rgb_array(path):
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_passes_through_exactly(tmp_path):
    pixels = RNG.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / "rgb.png")
    np.testing.assert_array_equal(_rgb_array(path), pixels)


def test_grayscale_is_replicated_into_three_channels(tmp_path):
    pixels = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
    path = _save(Image.fromarray(pixels, mode="L"), tmp_path / "gray.png")
    assert Image.open(path).mode == "L"
    np.testing.assert_array_equal(_rgb_array(path), np.repeat(pixels[..., None], 3, axis=2))


def test_rgba_is_composited_on_black(tmp_path):
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[..., :3] = 200
    pixels[..., 3] = [[0, 255, 128], [0, 255, 128]]  # transparent, opaque, half
    path = _save(Image.fromarray(pixels, mode="RGBA"), tmp_path / "rgba.png")
    result = _rgb_array(path)
    np.testing.assert_array_equal(result[:, 0], 0)     # transparent -> black background, not white
    np.testing.assert_array_equal(result[:, 1], 200)   # opaque -> its own colour
    assert np.all(np.abs(result[:, 2].astype(int) - 100) <= 1)  # half -> halfway to black


def test_gray_with_alpha_is_composited_on_black(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (180, 0))
    image.putpixel((1, 0), (180, 255))
    result = _rgb_array(_save(image, tmp_path / "la.png"))
    np.testing.assert_array_equal(result[0], [[0, 0, 0], [180, 180, 180]])


def test_palette_images(tmp_path):
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x, index in enumerate((1, 2, 0)):
        palette_image.putpixel((x, 0), index)
    path = _save(palette_image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(_rgb_array(path)[0], [[255, 0, 0], [0, 0, 255], [0, 0, 0]])

    palette_image.info["transparency"] = 1  # palette index 1 (red) is transparent -> black
    path = _save(palette_image, tmp_path / "palette_transparent.png", transparency=1)
    np.testing.assert_array_equal(_rgb_array(path)[0], [[0, 0, 0], [0, 0, 255], [0, 0, 0]])


def _expected_rescale(values):
    values = values.astype(np.float64)
    scaled = (values - values.min()) * 255.0 / (values.max() - values.min())
    return np.repeat(np.rint(scaled).astype(np.uint8)[..., None], 3, axis=2)


def test_16_bit_png_is_rescaled_by_its_own_range(tmp_path):
    # A 12-bit CT export stored in 16 bits: a fixed /256 would make it nearly black.
    values = RNG.integers(0, 4096, (5, 8)).astype(np.uint16)
    values[0, 0], values[0, 1] = 0, 4095
    path = _save(Image.fromarray(values), tmp_path / "ct16.png")
    assert Image.open(path).mode in ("I;16", "I")
    result = _rgb_array(path)
    np.testing.assert_array_equal(result, _expected_rescale(values))
    assert result.max() == 255 and result.min() == 0


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I", np.int32), ("F", np.float32)])
def test_other_high_bit_depth_tiffs(tmp_path, mode, dtype):
    values = (RNG.integers(0, 60000, (4, 6)) - (30000 if mode != "I;16B" else 0)).astype(dtype)
    if mode == "I;16B":
        image = Image.frombytes(mode, (6, 4), values.tobytes())
    else:
        image = Image.fromarray(values)
    path = _save(image, tmp_path / f"{mode.replace(';', '_')}.tif")
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(_rgb_array(path), _expected_rescale(values.astype(np.float64)))


def test_constant_16_bit_image_becomes_black():
    result = to_rgb(Image.fromarray(np.full((3, 3), 700, dtype=np.uint16)))
    assert result.mode == "RGB" and np.asarray(result).max() == 0


def test_one_bit_image(tmp_path):
    bits = np.array([[True, False, True]])
    path = _save(Image.fromarray(bits), tmp_path / "mask.png")
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(_rgb_array(path)[0], [[255] * 3, [0] * 3, [255] * 3])


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    result = _rgb_array(path)
    assert np.all(np.abs(result.astype(int) - [255, 0, 0]) <= 3)  # cyan 0, magenta+yellow full -> red


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 10, 3), dtype=np.uint8)
    pixels[:, :5] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=100)
    result = _rgb_array(path)
    assert result.shape == (10, 4, 3)  # width and height swapped
    assert result[:4].mean() > 200 and result[-4:].mean() < 50  # the white half ends up on top


def test_truncated_jpeg_raises_naming_path_and_cause(tmp_path):
    path = _save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "scan.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for check in (load_image, validate_image):
        with pytest.raises(ImageLoadError, match=r"scan\.jpg: cannot decode image, the file is truncated or corrupt"):
            check(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the loader must not flip the global switch


@pytest.mark.parametrize("name,keep_bytes", [("scan.png", 200), ("scan.jpg", 30), ("scan.png", 40)])
def test_truncated_png_or_header_raises(tmp_path, name, keep_bytes):
    path = _save(Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)), tmp_path / name)
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(ImageLoadError, match=rf"{name}: .*the file is truncated or corrupt"):
        load_image(path)


def test_not_an_image_and_missing_file(tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not a readable image"):
        load_image(text_file)
    with pytest.raises(ImageLoadError, match=r"absent\.png: image file not found"):
        validate_image(tmp_path / "absent.png")
    assert issubclass(ImageLoadError, OSError)


def test_validate_image_returns_size(tmp_path):
    path = _save(Image.new("L", (13, 7)), tmp_path / "ok.png")
    assert validate_image(path) == (13, 7)


def test_real_vqa_rad_image_loads(shared_data):
    path = next((shared_data / "vqa-rad" / "images").glob("synpic*.jpg"))
    image = load_image(path)
    assert image.mode == "RGB" and min(image.size) > 32
