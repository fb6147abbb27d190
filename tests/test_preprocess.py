import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline import preprocess
from pipeline.preprocess import Preprocessing, crop_rgb, decode, describe_error, open_rgb, resize_crop

from .conftest import SAMPLE

PREP = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo() -> Image.Image:
    return Image.open(next(iter(sorted((SAMPLE / "n01440764").iterdir())))).convert("RGB")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
# Resized whole by torch: straight from Pillow's memory, or copied from it when Pillow keeps the image
# in several blocks (3000 × 2000). Resampled in the crop's box by Pillow: whole resizes over 4× the crop.
@pytest.mark.parametrize("size", [(224, 224), (640, 480), (3000, 2000), (300, 1000), (2000, 100)])
def test_matches_torchvision_resize_and_centre_crop(interpolation, size):
    image = photo().resize(size)
    prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, interpolation)
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(224)])(image)
    data = encode(image, "PNG", compress_level=0)
    ours = decode(data, prep)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous  # copied into batches fast
    assert np.abs(ours.astype(int) - np.asarray(reference).astype(int)).mean() < 0.5
    batch = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    written = decode(data, prep, batch[1])
    assert np.shares_memory(written, batch) and np.array_equal(batch[1], ours) and not batch[0].any()


@pytest.mark.parametrize("shape, top, left", [((256, 256), 16, 16), ((256, 341), 16, 58), ((224, 300), 0, 38), ((300, 224), 38, 0)])
def test_crop_rgb_repacks_4_byte_pixels_as_a_plain_copy_would(shape, top, left):
    resized = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, *shape, 4), dtype=np.uint8)).permute(0, 3, 1, 2)
    window = resized[0, :3, top : top + 224, left : left + 224].permute(1, 2, 0).numpy()  # RGB, the padding byte dropped
    for channels in (4, 3):  # Pillow's repacking of RGBX, and torch's copy of plain RGB
        out = np.empty((224, 224, 3), dtype=np.uint8)
        assert crop_rgb(resized[:, :channels].contiguous(memory_format=torch.channels_last), top, left, out) is out
        assert np.array_equal(out, window)


def by_pillow(data: bytes) -> np.ndarray:
    return resize_crop(open_rgb(data, min_side=PREP.resize), PREP)


def test_the_shipped_photos_decode_by_simplejpeg_to_pillows_pixels():
    photos = sorted(SAMPLE.rglob("*.JPEG"))
    assert len(photos) >= 100
    for path in photos:
        data = path.read_bytes()
        assert preprocess._plain_jpeg(data, PREP) is not None, path
        assert np.array_equal(decode(data, PREP), by_pillow(data)), path


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(
    "options",
    [{"quality": 95}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True, "quality": 60}, {"optimize": True}],
    ids=["4:2:0", "4:4:4", "4:2:2", "progressive", "optimised"],
)
@pytest.mark.parametrize("size", [(224, 300), (301, 225), (150, 150), (511, 400)])  # (511, 400): the largest not decoded at reduced scale
def test_plain_jpegs_decode_by_simplejpeg_to_pillows_pixels(size, options, mode):
    data = encode(photo().resize(size).convert(mode), "JPEG", **options)
    assert preprocess._plain_jpeg(data, PREP) is not None
    assert np.array_equal(decode(data, PREP), by_pillow(data))


def rotated_90() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return exif


def orientation_in_xmp() -> bytes:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    return encode(photo().resize((300, 224)), "JPEG", xmp=xmp)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(photo().resize((300, 224)), "JPEG", exif=rotated_90()),
        orientation_in_xmp,
        lambda: encode(photo().convert("CMYK"), "JPEG"),
        lambda: encode(photo().resize((1024, 768)), "JPEG"),
        lambda: encode(photo().resize((120, 700)), "JPEG"),
        lambda: encode(photo(), "PNG"),
    ],
    ids=["exif-orientation", "xmp-orientation", "cmyk", "reduced-scale", "long", "png"],
)
def test_what_pillow_does_more_than_decode_takes_pillows_path(make):
    data = make()
    assert preprocess._plain_jpeg(data, PREP) is None
    assert np.array_equal(decode(data, PREP), by_pillow(data))


def test_without_simplejpeg_pillow_decodes_every_image(monkeypatch):
    """A Ray cluster's nodes may lack the optional package."""
    data = encode(photo().resize((300, 224)), "JPEG")
    expected = decode(data, PREP)
    monkeypatch.setattr(preprocess, "simplejpeg", None)
    assert preprocess._plain_jpeg(data, PREP) is None
    assert np.array_equal(decode(data, PREP), expected)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (400, 200), "white")
    image.paste((255, 0, 0), (0, 0, 200, 200))  # left half red
    upright = open_rgb(encode(image, "JPEG", exif=rotated_90()))
    assert upright.size == (200, 400)
    top = np.asarray(upright)[:100].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80  # the red half is now on top


@pytest.mark.parametrize(
    "make",
    [
        lambda: photo().convert("L"),
        lambda: photo().convert("CMYK"),
        lambda: photo().convert("RGBA"),
        lambda: photo().convert("P"),
        lambda: Image.fromarray(np.asarray(photo().convert("L")).astype(np.uint16) * 257),
    ],
    ids=["grayscale", "cmyk", "rgba", "palette", "16-bit"],
)
def test_odd_modes_decode_to_rgb(make):
    image = make()
    fmt = "JPEG" if image.mode in ("L", "CMYK") else "PNG" if image.mode != "P" else "GIF"
    out = decode(encode(image, fmt), PREP)
    assert out.shape == (224, 224, 3)
    assert 20 < out.mean() < 235  # real content, not black or white


def test_sixteen_bit_keeps_contrast():
    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (256, 1))
    out = decode(encode(Image.fromarray(ramp), "PNG"), PREP)
    assert out[:, 0].mean() < 30 and out[:, -1].mean() > 225


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"<html>not an image</html>", "not a recognised image"), (encode(photo(), "JPEG")[:2000], "truncated")],
    ids=["zero-bytes", "html", "truncated"],
)
def test_bad_files_raise_readable_errors(data, reason):
    with pytest.raises(Exception) as caught:
        decode(data, PREP)
    assert reason in describe_error(caught.value)


IMAGENET = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("crop=299", Preprocessing(342, 299, IMAGENET.mean, IMAGENET.std, "bilinear")),  # ImageNet's 224 of 256
        ("resize=320", Preprocessing(320, 224, IMAGENET.mean, IMAGENET.std, "bilinear")),
        (
            " crop=384 , resize=384, mean=0.5/0.5/0.5, std=0.5/0.5/0.5, interpolation=bicubic ",
            Preprocessing(384, 384, (0.5,) * 3, (0.5,) * 3, "bicubic"),
        ),
        ("", IMAGENET),
    ],
)
def test_a_networks_own_input_overrides_its_base_preprocessing(text, expected):
    assert IMAGENET.overridden(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("crop=8", "crop must be a whole number of pixels from 16 to 4096, got '8'"),
        ("crop=2.5", "crop must be a whole number of pixels"),
        ("crop=300,resize=256", "crop 300 is bigger than resize 256"),
        ("size=224", "unknown key 'size': use resize, crop, mean, std or interpolation"),
        ("mean=0.5/0.5", "mean must be three numbers separated by '/' (R/G/B), got '0.5/0.5'"),
        ("mean=nan/0.5/0.5", "mean must be three numbers separated by '/' (R/G/B), got 'nan/0.5/0.5'"),
        ("std=0.5/0/0.5", "std must be positive"),
        ("interpolation=nearest", "interpolation must be one of bilinear, bicubic, got 'nearest'"),
        ("crop=224,crop=256", "crop given twice"),
    ],
)
def test_a_bad_input_description_says_what_is_wrong(text, reason):
    with pytest.raises(ValueError) as caught:
        IMAGENET.overridden(text)
    assert str(caught.value).startswith(reason)
