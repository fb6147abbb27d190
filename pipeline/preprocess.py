"""Decode, orient, resize and centre-crop images into uint8 arrays, on the CPU and batch-wise.

The model actor receives uint8 crops (4× smaller than float32) and normalises them itself, so
only the pixels the model needs ever cross the object store. Plain JPEGs are decoded by simplejpeg,
other images by Pillow: at reduced scale (``draft``) for JPEGs much bigger than the target.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

try:  # libjpeg-turbo without Pillow's per-image overhead; optional: a Ray cluster's nodes may not have it
    import simplejpeg
except ImportError:
    simplejpeg = None

# Pillow's own guard: images over this many pixels are refused as decompression bombs.
Image.MAX_IMAGE_PIXELS = 178_956_970

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Up to this many times the crop's pixels, an image is resized whole and then cropped (4:3 photos: 1.7×)
MAX_RESIZED_PER_CROP = 4


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: shorter side resized to ``resize``, centre crop ``crop``."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def describe(self) -> str:
        return f"resize {self.resize} ({self.interpolation}), centre crop {self.crop}, mean {self.mean}, std {self.std}"

    def overridden(self, text: str) -> Preprocessing:
        """This preprocessing with ``text``'s values, ``key=value`` pairs separated by commas: ``resize``,
        ``crop`` (alone, the resize keeps this one's ratio to it: 224 of 256 → 299 of 342), ``mean`` and
        ``std`` (three values separated by ``/``), ``interpolation``. ValueError for anything else."""
        sizes: dict[str, int] = {}
        colours: dict[str, tuple[float, float, float]] = {}
        interpolation = self.interpolation
        seen: set[str] = set()
        for pair in filter(None, (item.strip() for item in text.split(","))):
            key, _, value = (part.strip() for part in pair.partition("="))
            if key in seen:
                raise ValueError(f"{key} given twice")
            seen.add(key)
            if key in ("resize", "crop"):
                sizes[key] = _whole_number(key, value)
            elif key in ("mean", "std"):
                colours[key] = _three_numbers(key, value)
            elif key == "interpolation":
                if value not in RESAMPLING:
                    raise ValueError(f"interpolation must be one of {', '.join(RESAMPLING)}, got {value!r}")
                interpolation = value
            else:
                raise ValueError(f"unknown key {key!r}: use resize, crop, mean, std or interpolation")
        crop = sizes.get("crop", self.crop)
        resize = sizes.get("resize", round(crop * self.resize / self.crop) if "crop" in sizes else self.resize)
        if crop > resize:
            raise ValueError(f"crop {crop} is bigger than resize {resize}")
        mean, std = colours.get("mean", self.mean), colours.get("std", self.std)
        if any(value <= 0 for value in std):
            raise ValueError("std must be positive")
        return Preprocessing(resize, crop, mean, std, interpolation)


def _whole_number(key: str, value: str) -> int:
    if not value.isdigit() or not 16 <= int(value) <= 4096:
        raise ValueError(f"{key} must be a whole number of pixels from 16 to 4096, got {value!r}")
    return int(value)


def _three_numbers(key: str, value: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(number) for number in value.split("/"))
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(number) for number in numbers):
        raise ValueError(f"{key} must be three numbers separated by '/' (R/G/B), got {value!r}")
    return numbers[0], numbers[1], numbers[2]


def open_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image; ``min_side`` lets JPEGs decode at a reduced scale."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()
    ImageOps.exif_transpose(image, in_place=True)  # not in place, an upright image is copied (90 µs at 224 px)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit and float scaled down, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max() if pixels.size else 0
        scale = 255.0 / 65535.0 if peak > 255 else 1.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_crop(image: Image.Image, prep: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """Shorter side to ``prep.resize`` then centre crop, with torchvision's ``Resize(resize)`` +
    ``CenterCrop(crop)`` geometry and Pillow's filters, into ``out`` (crop, crop, 3) or a new array.

    torch's antialiased uint8 kernels resize the whole image, straight from Pillow's memory, then it is
    cropped (``crop_rgb``): 0.15 ms against 0.55 for Pillow's bicubic resample of only the crop's box
    (0.33 bilinear), 224-px Imagenette photos, with the same pixels (efficientnet_lite0's forward pass is
    ~6 ms an image on one core). A very long or tall image, whose whole resize would be many times the
    crop, keeps Pillow's box resample.
    """
    if out is None:
        out = np.empty((prep.crop, prep.crop, 3), dtype=np.uint8)
    width, height = image.size
    new_w, new_h = _resized_size(width, height, prep)
    if _resizes_whole(new_w, new_h, prep):
        return _resize_whole(pixels(image), prep, out)
    top, left = _crop_corner(new_w, new_h, prep)
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + prep.crop) * sx, (top + prep.crop) * sy)
    out[...] = np.asarray(image.resize((prep.crop, prep.crop), RESAMPLING[prep.interpolation], box=box, reducing_gap=None))
    return out


def _resized_size(width: int, height: int, prep: Preprocessing) -> tuple[int, int]:
    """(width, height) with the shorter side at ``prep.resize``, as torchvision's ``Resize`` rounds it."""
    if width <= height:
        return prep.resize, int(prep.resize * height / width)
    return int(prep.resize * width / height), prep.resize


def _resizes_whole(new_w: int, new_h: int, prep: Preprocessing) -> bool:
    return new_w * new_h <= MAX_RESIZED_PER_CROP * prep.crop * prep.crop


def _crop_corner(new_w: int, new_h: int, prep: Preprocessing) -> tuple[int, int]:
    """(top, left) of the centre crop, as torchvision's ``CenterCrop`` rounds it."""
    return round((new_h - prep.crop) / 2.0), round((new_w - prep.crop) / 2.0)


def _resize_whole(image, prep: Preprocessing, out: np.ndarray) -> np.ndarray:
    """Resize a (1, C, H, W) uint8 tensor whole (shorter side to ``prep.resize``), then crop it into ``out``."""
    from torch.nn.functional import interpolate

    new_w, new_h = _resized_size(image.shape[3], image.shape[2], prep)
    resized = interpolate(image, size=(new_h, new_w), mode=prep.interpolation, antialias=True)
    return crop_rgb(resized, *_crop_corner(new_w, new_h, prep), out)


def crop_rgb(resized, top: int, left: int, out: np.ndarray) -> np.ndarray:
    """The window of ``out``'s size at (``top``, ``left``) of a resized (1, C, H, W) channels-last uint8
    tensor, into ``out`` as RGB.

    A resize of Pillow's memory has 4 bytes a pixel (RGB and padding, see ``pixels``). Pillow repacks the
    window's rows to 3 bytes a pixel in C: ~25 µs an image, where torch's copy of a 3-of-4-channel view
    took ~90, looping over 3 values at a time (224-px crops).
    """
    import torch

    crop = out.shape[0]
    width = resized.shape[3]
    if resized.shape[1] == 4:
        stride = width * 4  # bytes per row
        rows = resized.permute(0, 2, 3, 1).numpy().reshape(-1)[top * stride :]
        packed = Image.frombuffer("RGBX", (width, crop), rows, "raw", "RGBX", stride, 1).tobytes("raw", "RGB")
        out[...] = np.frombuffer(packed, np.uint8).reshape(crop, width, 3)[:, left : left + crop]
    else:
        torch.from_numpy(out).copy_(resized[0, :, top : top + crop, left : left + crop].permute(1, 2, 0))
    return out


def pixels(image: Image.Image):
    """An RGB image as a (1, C, H, W) uint8 tensor: Pillow's own memory lent through Arrow (C = 4: RGB and
    a padding byte, which torch's kernels add anyway), or a copy (C = 3) of an image Pillow keeps in
    several blocks (one over 16 MB); ``np.asarray`` would copy it at 1.7 ns a pixel."""
    import torch

    width, height = image.size
    try:
        # .values: a fresh export has no offset to apply; .flatten() would import pyarrow.compute (20 ms a worker)
        lent = torch.from_dlpack(pa.array(image).values)
    except ValueError:  # "Image rows are not contiguous in memory"
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    return lent.view(1, height, width, 4).permute(0, 3, 1, 2)


def decode(data: bytes, prep: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """Bytes → (crop, crop, 3) uint8, ready for the model actor; or into ``out``."""
    if out is None:
        out = np.empty((prep.crop, prep.crop, 3), dtype=np.uint8)
    plain = _plain_jpeg(data, prep)
    return resize_crop(open_rgb(data, min_side=prep.resize), prep, out) if plain is None else _resize_whole(plain, prep, out)


def _plain_jpeg(data: bytes, prep: Preprocessing):
    """The pixels of a JPEG that ``open_rgb`` would decode as it is stored, as a (1, 4, H, W) RGBX tensor
    decoded by simplejpeg: libjpeg-turbo with Pillow's settings (accurate integer IDCT, smooth upsampling),
    so the same pixels, without Pillow's overhead (decode and crop of a 224-px Imagenette photo: 0.24 ms
    against 0.34; efficientnet_lite0's forward pass takes ~6 ms an image on one core).

    None, for ``open_rgb`` to decode, where Pillow would do more than decode: another format or colour
    space than YCbCr or grey, an orientation tag (EXIF, or XMP's that Pillow also reads), a decode at
    reduced scale (``draft``), a whole resize too big for ``_resize_whole``; or where simplejpeg fails
    (a corrupt file: Pillow may still read it, or says why not). Those size bounds keep decompression
    bombs out too: the image is at most a few times the crop."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff":
        return None
    import torch

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or min(width // prep.resize, height // prep.resize) >= 2:
            return None
        if not _resizes_whole(*_resized_size(width, height, prep), prep):
            return None
        if b"Exif\x00\x00" in data or b"tiff:Orientation" in data:  # after the size checks: a big photo is not scanned
            return None
        rgbx = simplejpeg.decode_jpeg(data, "RGBX")
    except ValueError:
        return None
    return torch.from_numpy(rgbx).unsqueeze(0).permute(0, 3, 1, 2)


def describe_error(error: Exception) -> str:
    """A readable one-line reason for an image that could not be decoded."""
    if isinstance(error, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return f"image too large (decompression bomb guard): {error}"
    if isinstance(error, Image.UnidentifiedImageError):
        return "not a recognised image format (corrupt, or not an image)"
    text = str(error).strip() or type(error).__name__
    if "truncated" in text.lower():
        return f"truncated image data: {text}"
    return f"{type(error).__name__}: {text}" if not isinstance(error, ValueError) else text


def thumbnail_jpeg(data: bytes, size: int = 224, quality: int = 85) -> bytes:
    """A small upright JPEG of an image (for galleries and reports), decoded at reduced scale."""
    image = open_rgb(data, min_side=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
