"""Photos -> normalised float32 tensors ``[3, S, S]``, for every kind of photo a user has.

JPEG, PNG, WebP, GIF (first frame), BMP and TIFF; RGB, grayscale, palette, transparent (composited over white), CMYK
and 16-bit; the EXIF orientation applied. The recipe of ``flickr8k_mini_precomp`` ("How the features were made"):
converted to RGB, resized to S x S with Pillow's bilinear filter (aspect ratio not kept, no crop), then scaled as the
:class:`~.backbones.Normalization` says (``imagenet``: /255, minus the ImageNet mean, over its std; ``tf_lite``:
``(x - 127) / 128`` on the 0-255 values).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.importers import PHOTO_SUFFIXES
from ..errors import ConfigError, DataError
from .backbones import Normalization

__all__ = ["MAX_PHOTO_PIXELS", "PHOTO_SUFFIXES", "open_photo", "photo_tensor", "to_rgb"]

#: The most pixels a photo may have, checked from its header before anything is decoded: Pillow's own
#: decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``' default, 89.5 megapixels: 268 MB as RGB and up to
#: 0.7 GB while a 16-bit photo is scaled). Real photos are far smaller (a 50-megapixel camera: 8,688 x 5,792).
MAX_PHOTO_PIXELS = 89_478_485


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ConfigError("reading photos needs Pillow; install it with pip install -e '.[features]'") from None
    return Image, ImageOps


def open_photo(path: str | Path):
    """The photo at ``path``, opened lazily (header only): DataError for an empty file, a file that is not a photo
    Pillow reads, or one of more than :data:`MAX_PHOTO_PIXELS` pixels, naming the file."""
    Image, _ = _pil()
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"photo {path} is an empty file (0 bytes); replace it or leave it out (--skip_bad)")
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refused below, by size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message: "Image size (N pixels) exceeds ..."
        raise _too_large(path, int(found.group(1)) if found else None) from None
    except Image.UnidentifiedImageError:
        raise DataError(f"photo {path} is not an image Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF); replace it "
                        "or leave it out (--skip_bad)") from None
    except OSError as e:
        raise DataError(f"photo {path} cannot be read ({e.strerror or e}); replace it or leave it out "
                        "(--skip_bad)") from None
    width, height = image.size
    if width * height > MAX_PHOTO_PIXELS:
        image.close()
        raise _too_large(path, width * height)
    return image


def _too_large(path: Path, pixels: int | None) -> DataError:
    found = f"{pixels:,} pixels" if pixels else "too many pixels"
    return DataError(f"photo {path} has {found}, over the limit of {MAX_PHOTO_PIXELS:,} (Pillow's decompression-bomb "
                     "threshold); shrink it (for example to 4,000 px on the long side) or leave it out (--skip_bad)")


def to_rgb(image) -> "PIL.Image.Image":  # noqa: F821
    """An opened photo -> an 8-bit RGB photo the right way up (EXIF orientation applied, first frame of an
    animation, 16-bit scaled to 8-bit, transparency composited over white, CMYK converted)."""
    Image, ImageOps = _pil()
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert("RGB") clips 16-bit values at 255 (a white photo); scale 0..65535 to 0..255 instead
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def photo_tensor(path: str | Path, size: int, scaling: Normalization) -> Tensor:
    """The photo at ``path`` as a float32 tensor ``[3, size, size]``: ``(pixels / scale - mean) / std``.

    DataError (naming the file) for anything that cannot be decoded, a truncated file included.
    """
    Image, _ = _pil()
    image = open_photo(path)
    try:
        with image:
            rgb = to_rgb(image).resize((size, size), Image.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data shows only when decoding
        raise DataError(f"photo {path} cannot be decoded ({e}); replace it or leave it out (--skip_bad)") from None
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / scaling.scale).permute(2, 0, 1)
    return (pixels - torch.tensor(scaling.mean).view(3, 1, 1)) / torch.tensor(scaling.std).view(3, 1, 1)
