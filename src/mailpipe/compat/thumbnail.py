"""Mailpit's attachment thumbnails: 180x120 JPEG, an image cropped to fill it, a smaller one
padded, anything that is not an image a blank one. Pillow is imported on first use."""

from __future__ import annotations

import io

WIDTH, HEIGHT = 180, 120
BACKGROUND = (255, 255, 255)
# A decompression bomb (a tiny file claiming a huge canvas) is refused, not decoded.
MAX_PIXELS = 40_000_000


def thumbnail(data: bytes) -> bytes:
    """The JPEG thumbnail of `data`. CPU work: call it in a thread."""
    from PIL import Image, ImageOps

    canvas = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > MAX_PIXELS:
            raise ValueError("image too large")
        image.load()
    except Exception:  # not an image, or one Pillow cannot read: a blank thumbnail
        return _jpeg(canvas)
    image = _flat(ImageOps.exif_transpose(image) or image)
    if image.width >= WIDTH and image.height >= HEIGHT:
        return _jpeg(ImageOps.fit(image, (WIDTH, HEIGHT), Image.Resampling.LANCZOS))
    image.thumbnail((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    canvas.paste(image, ((WIDTH - image.width) // 2, (HEIGHT - image.height) // 2))
    return _jpeg(canvas)


def _flat(image):  # type: ignore[no-untyped-def]
    """RGB on white: JPEG has no transparency."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")


def _jpeg(image) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()
