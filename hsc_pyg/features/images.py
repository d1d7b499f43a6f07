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

__all__ = ["PHOTO_SUFFIXES", "open_photo", "photo_tensor", "to_rgb"]


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ConfigError("reading photos needs Pillow; install it with pip install -e '.[features]'") from None
    return Image, ImageOps


def open_photo(path: str | Path):
    """The photo at ``path``, opened lazily (header only): DataError for an empty file, a file that is not a photo
    Pillow reads, or one over Pillow's decompression-bomb limit, naming the file."""
    Image, _ = _pil()
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"photo {path} is an empty file (0 bytes); replace it or leave it out (--skip_bad)")
        with warnings.catch_warnings():
            # above MAX_IMAGE_PIXELS Pillow only warns; photos up to twice that (about 179 megapixels) are read
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message: "Image size (N pixels) exceeds ..."
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise DataError(f"photo {path} has {pixels}, over Pillow's decompression-bomb limit of "
                        f"{2 * Image.MAX_IMAGE_PIXELS:,}; shrink it (for example to 4,000 px on the long side) or "
                        "leave it out (--skip_bad)") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"photo {path} is not an image Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF); replace it "
                        "or leave it out (--skip_bad)") from None
    except OSError as e:
        raise DataError(f"photo {path} cannot be read ({e.strerror or e}); replace it or leave it out "
                        "(--skip_bad)") from None


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
