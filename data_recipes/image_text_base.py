"""Helpers shared by the image-text recipes: images to raw RGB bytes, binary columns.

Image-text records (see `data_recipes.base`) hold images as raw uint8 RGB pixels of a fixed
``image_size`` x ``image_size``: decoding and resizing happen once, at preparation time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

# Resize: squash the centre square crop to the target size (keeps aspect, loses borders).
RESAMPLE = "BICUBIC"


def to_rgb_bytes(image: Any, size: int, where: str, base_dir: Path | None = None) -> bytes:
    """Raw (size, size, 3) uint8 bytes from a PIL image, encoded bytes, a ``{"bytes", "path"}``
    dict (``datasets.Image``) or a file path (relative to ``base_dir``).

    Raises:
        ValueError: naming ``where`` when the image is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    try:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, (bytes, bytearray)):
            pil = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, Path)) and str(image):
            path = Path(image)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            if not path.is_file():
                raise ValueError(f"{where}: image file {str(path)!r} does not exist")
            pil = Image.open(path)
        else:
            raise ValueError(f"{where}: no image (got {type(image).__name__}); use records-only "
                             "mode for rows without images")
        pil = pil.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: cannot decode the image: {err}") from err
    w, h = pil.size
    edge = min(w, h)
    left, top = (w - edge) // 2, (h - edge) // 2
    pil = pil.crop((left, top, left + edge, top + edge)).resize((size, size), getattr(Image, RESAMPLE))
    return pil.tobytes()


def binary_value(value: Any, column: str, where: str) -> int:
    """0 or 1 from a bool / 0 / 1 (ints or floats equal to them); anything else is an error."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    raise ValueError(f"{where}: column {column!r} must be binary (0/1 or true/false), got {value!r}")


def check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    return image_size
