"""The official BAGEL image transform (`MaxLongEdgeMinShortEdgeResize` + ToTensor + Normalize(0.5, 0.5)).

    scale = min(max_size / long_side, 1); scale = max(scale, min_size / short_side)
    each side -> round(side * scale), then to the nearest multiple of `stride` (at least `stride`)
    if w * h > max_pixels / img_num: rescale by max_pixels / img_num / (w * h) (same rounding)
    if the long side > max_size: rescale by max_size / long side (same rounding)
    PIL bicubic resize; pixels / 255, then (x - 0.5) / 0.5 -> [-1, 1].

Inference defaults: VAE (1024, 512, 16), ViT (980, 224, 14), max_pixels 14*14*9*1024.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

__all__ = ["ImageTransform", "pil_img2rgb", "unsupported_mode", "resize_shape", "to_unit_range", "from_unit_range"]


# PIL modes whose convert("RGB") clips (values above 255 -> white), as the official pil_img2rgb does: 16-bit
# greyscale PNGs open as I;16 (or I), TIFFs may be I or F. 16-bit RGB PNGs open as RGB (8 bits) and are fine.
_CLIPPED_MODES = {"I;16": "16-bit greyscale", "I;16B": "16-bit greyscale", "I;16L": "16-bit greyscale",
                  "I;16N": "16-bit greyscale", "I": "32-bit integer greyscale", "F": "32-bit float greyscale"}


def unsupported_mode(image: Image.Image) -> str | None:
    """Why `image` cannot be used (None when it can): a mode whose conversion to RGB clips it (a 16-bit
    greyscale image comes out almost white), which would be fed on without a word."""
    what = _CLIPPED_MODES.get(image.mode)
    if what is None:
        return None
    return (f"{what} image (PIL mode {image.mode}): its conversion to RGB clips values above 255 (white); "
            "convert it to 8-bit first")


def pil_img2rgb(image: Image.Image) -> Image.Image:
    """Official `pil_img2rgb` (training data and the inferencer's inputs): RGBA / transparent images go on
    white, everything else to RGB."""
    if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
        image = image.convert("RGBA")
        white = Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(w: int, h: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(w * scale), stride), _make_divisible(round(h * scale), stride)


def valid_sides(v) -> bool:
    """Whether `v` is the [max, min] image sides of a resize setting (--vae-transform / --vit-transform, or their
    JSON form): two integers, 0 < min <= max."""
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v) and 0 < v[1] <= v[0])


def resize_shape(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int,
                 img_num: int = 1) -> tuple[int, int]:
    """(new_w, new_h) of the official resize rule."""
    scale = min(max_size / max(w, h), 1.0)
    scale = max(scale, min_size / min(w, h))
    nw, nh = _apply_scale(w, h, scale, stride)
    if nw * nh > max_pixels / img_num:
        scale = max_pixels / img_num / (nw * nh)
        nw, nh = _apply_scale(nw, nh, scale, stride)
    if max(nw, nh) > max_size:
        scale = max_size / max(nw, nh)
        nw, nh = _apply_scale(nw, nh, scale, stride)
    return nw, nh


def to_unit_range(img: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 [H, W, 3] in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return (a - 0.5) / 0.5


def from_unit_range(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8, as the official decode: (x * 0.5 + 0.5).clamp(0, 1) * 255, truncated."""
    return (np.clip(np.asarray(x, np.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def __post_init__(self):
        if not (0 < self.min_size <= self.max_size and self.stride >= 1 and self.max_pixels >= 1):
            raise ValueError(f"image transform (max_size={self.max_size}, min_size={self.min_size}, "
                             f"stride={self.stride}, max_pixels={self.max_pixels}): needs 0 < min_size <= max_size, "
                             "stride >= 1, max_pixels >= 1")

    @classmethod
    def vae_default(cls) -> "ImageTransform":
        return cls(1024, 512, 16)

    @classmethod
    def vit_default(cls) -> "ImageTransform":
        return cls(980, 224, 14)

    def resize(self, img: Image.Image, img_num: int = 1) -> Image.Image:
        """The official resize of `pil_img2rgb(img)` (transparent pixels on white, as every official caller
        converts first); a mode whose conversion clips (`unsupported_mode`) is a ValueError."""
        bad = unsupported_mode(img)
        if bad:
            raise ValueError(f"cannot resize the image: {bad}")
        img = pil_img2rgb(img)
        w, h = img.size
        nw, nh = resize_shape(w, h, self.max_size, self.min_size, self.stride, self.max_pixels, img_num)
        return img.resize((nw, nh), Image.Resampling.BICUBIC)

    def __call__(self, img: Image.Image, img_num: int = 1) -> np.ndarray:
        """PIL image -> float32 [H, W, 3] in [-1, 1], both sides multiples of `stride`."""
        return to_unit_range(self.resize(img, img_num))
