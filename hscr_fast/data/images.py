"""Load any medical image file as an 8-bit RGB PIL image, or fail with one clear line naming the file and the cause.

Medical VQA sets mix modes: grayscale scans (L), 16-bit exports of CT/MRI (I;16, I;16B, I), palette PNGs (P),
bi-level masks (1), RGBA screenshots, the odd CMYK JPEG. Vision towers want RGB, so everything is brought there:

* 16-bit and 32-bit images are rescaled to 0..255 by the image's own minimum and maximum. DICOM exports often use
  only 10-12 of their 16 bits; a fixed divide-by-256 would turn such a scan almost black.
* Transparency is composited onto black, not white: in CT, MRI and X-ray the background outside the body is black,
  and a white fill would add a bright frame a model can mistake for tissue or contrast.
* EXIF orientation is applied (photographed slides, phone captures).
* Multi-frame files (TIFF stacks, GIFs) give their first frame (the one PIL opens on).

Decoding is forced inside `load_image` (`img.load()`), so a truncated or corrupt file fails here with `ImageLoadError`
rather than later inside a data loader. `ImageFile.LOAD_TRUNCATED_IMAGES` is deliberately left alone: setting it
process-wide would make every truncated image load silently as a partly grey picture.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from hscr_fast.runtime.errors import HscrError

_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageLoadError(HscrError, OSError):
    """An image file is missing, not an image, truncated or corrupt; the message names the path and the cause."""


OUTSIDE_FOLDER_FLAG = "--allow-images-outside-folder"


class ImageOutsideFolderError(HscrError):
    """A record's image path leads outside the image folder (absolute, `..`, or a symlink that leaves it)."""


def image_in_folder(image_folder: str | os.PathLike, name: str, *, allow_outside: bool = False) -> Path:
    """`image_folder / name`, refused (`ImageOutsideFolderError`) when its real location, symlinks followed, is not
    inside the folder's: data files name images relative to --image-folder, and a path that leaves it (to
    /etc/passwd, say) is a mistake or an attack, not data. `allow_outside` is the users' explicit opt-out."""
    path = Path(image_folder) / name
    if allow_outside:
        return path
    folder, real = Path(image_folder).resolve(), path.resolve()
    if folder not in real.parents:
        raise ImageOutsideFolderError(f"image path {name!r} leads outside the image folder {folder} (to {real}); "
                                      f"keep images inside it, or pass {OUTSIDE_FOLDER_FLAG} if they really live "
                                      f"elsewhere")
    return path


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, translating every failure into ImageLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a readable image (unknown format, or the file is truncated or corrupt)") \
            from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path}: image too large to load safely ({error})") from error
    except Exception as error:  # PIL's format plugins raise assorted types (OSError, SyntaxError, ValueError, ...)
        raise ImageLoadError(f"{path}: cannot read the image header, the file is truncated or corrupt "
                             f"({type(error).__name__}: {error})") from error
    try:
        image.load()  # forces the full decode: truncation shows up here, not at first use
    except Exception as error:
        image.close()
        raise ImageLoadError(f"{path}: cannot decode image, the file is truncated or corrupt "
                             f"({type(error).__name__}: {error})") from error
    return image


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth single-channel image to L by its own min/max (a constant image becomes black)."""
    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    else:
        values = np.zeros_like(values)
    return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")


def _composite_on_black(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (0, 0, 0))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to RGB following the rules in the module docstring."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _rescale_to_8bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return _composite_on_black(image)
    # L, 1, P, CMYK, YCbCr, LAB, HSV and the rest: PIL's own conversions are correct for these.
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load `path` as an 8-bit RGB image with EXIF orientation applied; raises ImageLoadError with the cause."""
    image = _open_decoded(path)
    try:
        oriented = ImageOps.exif_transpose(image)
        return to_rgb(oriented)
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(f"{path}: cannot convert {image.mode} image to RGB ({type(error).__name__}: {error})") \
            from error
    finally:
        image.close()


def validate_image(path: str | os.PathLike) -> tuple[int, int]:
    """Check up front that `path` decodes completely; returns its (width, height) or raises ImageLoadError."""
    image = _open_decoded(path)
    size = image.size
    image.close()
    return size
