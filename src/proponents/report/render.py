"""Turning one example into HTML: an inline PNG image or escaped text.

Images are encoded with a small PNG writer built on :mod:`zlib`, so rendering needs no
imaging library; they are embedded as ``data:`` URIs, which keeps a report a single
self-contained file.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

#: Small images are enlarged (nearest neighbour) until their longer side reaches this.
MIN_IMAGE_SIDE = 64
#: Text longer than this many characters is cut, with an ellipsis.
MAX_TEXT_CHARS = 400

RenderFn = Callable[[Any], Any]


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an 8-bit image as PNG.

    Args:
        image: ``(H, W)`` grayscale, or ``(H, W, 3)`` RGB / ``(H, W, 4)`` RGBA, dtype uint8.

    Returns:
        The bytes of a PNG file.

    Raises:
        ValueError: the array is not an 8-bit image of one of those shapes.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"png_bytes needs a uint8 array, got dtype {image.dtype}")
    if image.ndim == 2:
        color_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        color_type, channels = (2, 3) if image.shape[2] == 3 else (6, 4)
    else:
        raise ValueError(f"png_bytes needs (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    height, width = image.shape[:2]
    rows = np.ascontiguousarray(image).reshape(height, width * channels)
    # Filter type 0 (none) in front of every scanline.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """A ``data:image/png;base64,…`` URI holding ``png`` (or an image of type ``mime``)."""
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def image_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes a browser shows (PNG, JPEG, GIF, WebP), by
    their signature, or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


#: Tensor dtypes NumPy has an equivalent of; others (bfloat16, float8, complex32) are widened.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_NUMPY_COMPLEX = (torch.complex64, torch.complex128)


def tensor_numpy(value: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array on the CPU.

    Floating-point dtypes NumPy lacks (``bfloat16``, the ``float8`` kinds) become
    ``float32``, and ``complex32`` becomes ``complex64``; ``.numpy()`` refuses them.
    """
    value = value.detach().cpu().resolve_conj().resolve_neg()
    if value.dtype.is_floating_point and value.dtype not in _NUMPY_FLOATS:
        value = value.float()
    elif value.dtype.is_complex and value.dtype not in _NUMPY_COMPLEX:
        value = value.to(torch.complex64)
    return value.numpy()


def object_rows(rows: Iterable[Any]) -> np.ndarray:
    """A 1-D object array with one entry per example, each kept as it is (a list, say),
    where ``np.asarray`` would make a 2-D array or refuse rows of different lengths."""
    listed = list(rows)
    out = np.empty(len(listed), dtype=object)
    for i, row in enumerate(listed):
        out[i] = row
    return out


def _to_numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return tensor_numpy(value)
    if isinstance(value, np.ndarray):
        return value
    return None


def as_image(value: Any) -> np.ndarray | None:
    """Interpret ``value`` as an image, if it looks like one.

    Recognised: floating-point or uint8 arrays/tensors of shape ``(H, W)``, ``(1|3|4, H, W)``
    (channels first, as PyTorch stores images) or ``(H, W, 1|3|4)``, with ``H, W >= 2``.
    Floating-point values are scaled per image from their minimum to their maximum.

    Returns:
        A uint8 ``(H, W)`` or ``(H, W, C)`` array, or ``None`` when ``value`` is no image.
    """
    array = _to_numpy(value)
    if array is None or array.dtype == np.bool_:
        return None
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == np.uint8):
        return None
    while array.ndim > 2 and array.shape[0] == 1 and array.ndim > 3:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or array.shape[0] < 2 or array.shape[1] < 2:
        return None
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        return None
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(array.shape, np.uint8)
        low, high = values[finite].min(), values[finite].max()
        scale = 255.0 / (high - low) if high > low else 0.0
        values = np.where(finite, (values - low) * scale, 0.0)
        array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return array


def enlarge(image: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Enlarge a small image by an integer factor (nearest neighbour) to at least ``min_side``."""
    factor = max(1, math.ceil(min_side / max(image.shape[0], image.shape[1])))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _text_of(value: Any) -> str:
    array = _to_numpy(value)
    if array is not None:
        flat = array.reshape(-1)
        shown = ", ".join(str(v) for v in flat[:64].tolist())
        more = ", …" if flat.size > 64 else ""
        return f"[{shown}{more}]"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:  # neither text nor an image we know: say what it is
            return f"<{len(value)} bytes: not UTF-8 text, nor a PNG, JPEG, GIF or WebP image>"
    return value if isinstance(value, str) else repr(value)


def example_html(value: Any, alt: str) -> tuple[str, bool]:
    """HTML for one example: an ``<img>`` for images, escaped text otherwise.

    Args:
        value: the rendered example: an image array/tensor, an object with ``_repr_png_``
            (a PIL image, say), PNG, JPEG, GIF or WebP ``bytes``, UTF-8 text ``bytes``, a
            string, or anything else (shown as its repr).
        alt: alternative text of the image (escaped here).

    Returns:
        ``(html, is_image)``.
    """
    png: bytes | None = None
    mime = "image/png"
    if isinstance(value, bytes) and image_type(value) is not None:
        png, mime = value, image_type(value) or mime
    elif hasattr(value, "_repr_png_") and not isinstance(value, (torch.Tensor, np.ndarray)):
        try:
            png = value._repr_png_()
        except Exception:  # noqa: BLE001 - a broken _repr_png_ falls back to text
            png = None
    else:
        image = as_image(value)
        if image is not None:
            png = png_bytes(enlarge(image))
    if png is not None:
        return (
            f'<img class="ex-img" src="{data_uri(png, mime)}" '
            f'alt="{html.escape(alt, quote=True)}">',
            True,
        )
    text = _text_of(value)
    if len(text) > MAX_TEXT_CHARS:
        text = text[: MAX_TEXT_CHARS - 1] + "…"
    return f'<div class="ex-text">{html.escape(text)}</div>', False


def default_render(inputs: tuple[Any, ...]) -> Any:
    """What an example shows by default: its only model input, or all inputs as text."""
    if len(inputs) == 1:
        return inputs[0]
    return " | ".join(_text_of(x) for x in inputs)
