"""Image loading and bounded resizing, so calibration memory is predictable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

from PIL import Image

#: Default bound on width*height of any calibration image (512*512). Larger images are scaled
#: down, aspect ratio kept, before a processor sees them: for Qwen2-VL this caps one image at
#: about 334 visual tokens (14-px patches, 2x2 merge); fixed-resolution families (llava 336 px,
#: gemma3 896 px, mllama 560-px tiles, idefics3 364/512-px crops) resize again to their own size.
DEFAULT_MAX_PIXELS = 512 * 512

ImageSource = Union[str, Path, Image.Image]


class ImageError(ValueError):
    """An image file is missing or unreadable; the message names the file."""


def open_image(source: ImageSource) -> Image.Image:
    """Return an RGB PIL image from a path or an image (the only I/O here: reading the file)."""
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"image file unreadable: {path} ({err})") from None


def check_image(path: ImageSource) -> None:
    """Raise `ImageError` unless `path` is an image Pillow can decode (cheap header check)."""
    if isinstance(path, Image.Image):
        return
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as err:  # Pillow raises many types for corrupt files
        raise ImageError(f"image file unreadable: {p} ({type(err).__name__}: {err})") from None


def bound_image(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Scale `image` down (aspect kept, bicubic) so that width*height <= max_pixels; never up."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    new = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)
