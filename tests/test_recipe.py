"""Recipes inside PNG, JPEG and WebP files (``kandinsky22.recipe``): round trips, the Exif layout, byte orders, errors.

Encoding only: no model runs.
"""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import TiffImagePlugin
from PIL.PngImagePlugin import PngInfo

from kandinsky22.jobs import Job
from kandinsky22.recipe import (
    RECIPE_KEY,
    encode_image,
    job_from_recipe,
    make_recipe,
    read_recipe,
    save_image,
    transcode,
)

FORMATS = ("png", "jpeg", "webp")
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PROMPTS = ("рыжий кот в шляпе, 4k photo", 'a cat 🐱🎩, "quoted", back\\slash, 猫', "plain ascii")


def noise(width: int = 48, height: int = 32, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def recipe_for(prompt: str, **fields: object) -> dict:
    job = Job(prompt=prompt, negative="размыто 😶", seed=7, steps=3, width=64, height=64, **fields)
    return make_recipe(job, "cpu", "fp32")


def magic(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "?"


def previous_png_writer(image: PIL.Image.Image, path: Path, recipe: dict) -> None:
    """``save_png`` as it was before JPEG and WebP (commit 07cd6ac): the bytes PNG outputs must keep."""
    info = PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)


def jpeg_with_comment(comment: bytes, endian: str = "<") -> bytes:
    """A JPEG whose Exif IFD has ``comment`` as UserComment, written with Pillow's Exif API in ``endian`` order."""
    exif = PIL.Image.Exif()
    exif.endian = endian
    exif.get_ifd(0x8769)[0x9286] = comment
    buffer = io.BytesIO()
    noise().save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("output_format", FORMATS)
def test_recipes_round_trip_in_each_format_with_any_prompt(output_format: str, tmp_path: Path) -> None:
    image = noise()
    for n, prompt in enumerate(PROMPTS):
        recipe = recipe_for(prompt)
        data = encode_image(image, recipe, output_format)
        assert magic(data) == output_format
        assert read_recipe(data) == recipe
        path = save_image(image, tmp_path / f"{n}{SUFFIXES[output_format].upper()}", recipe)  # the suffix decides
        assert path.read_bytes() == data
        assert read_recipe(path) == recipe
        assert job_from_recipe(read_recipe(path)) == job_from_recipe(recipe)
        assert read_recipe(path)["prompt"] == prompt and read_recipe(path)["negative"] == "размыто 😶"
        with PIL.Image.open(path) as opened:
            assert (opened.format, opened.size, opened.mode) == (PIL_FORMATS[output_format], (48, 32), "RGB")


def test_png_bytes_are_those_of_the_previous_writer(tmp_path: Path) -> None:
    recipe = recipe_for(PROMPTS[1])
    for n, size in enumerate([(48, 32), (80, 72), (1024, 16)]):
        image = noise(*size, seed=n)
        previous_png_writer(image, tmp_path / f"old-{n}.png", recipe)
        expected = (tmp_path / f"old-{n}.png").read_bytes()
        assert encode_image(image, recipe) == expected
        assert save_image(image, tmp_path / f"new-{n}.png", recipe).read_bytes() == expected
        assert transcode(expected, "png") == expected


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_the_recipe_is_the_exif_user_comment_in_utf16_big_endian(output_format: str) -> None:
    recipe = recipe_for(PROMPTS[0])
    text = json.dumps(recipe, ensure_ascii=False, sort_keys=True)
    with PIL.Image.open(io.BytesIO(encode_image(noise(), recipe, output_format))) as image:
        exif = image.getexif()
        assert exif.endian == ">"
        assert exif.get_ifd(0x8769)[0x9286] == b"UNICODE\0" + text.encode("utf-16-be")
        # The Exif standard's type for UserComment is UNDEFINED (7); piexif (AUTOMATIC1111's reader) needs it.
        tiff = image.info["exif"].removeprefix(b"Exif\x00\x00")
    (exif_ifd_offset,) = struct.unpack(">I", tiff[8 + 2 + 8 : 8 + 2 + 12])
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
    file = io.BytesIO(tiff)  # the entries' offsets count from the TIFF header
    file.seek(exif_ifd_offset)
    exif_ifd.load(file)
    assert exif_ifd.tagtype[0x9286] == 7


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_piexif_reads_the_recipe(output_format: str) -> None:
    """An Exif reader that is not Pillow: piexif, with which AUTOMATIC1111's web UI reads a picture's parameters."""
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")

    recipe = recipe_for(PROMPTS[1])
    data = encode_image(noise(), recipe, output_format, quality=80)
    exif = piexif.load(data)
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert json.loads(helper.UserComment.load(comment)) == recipe


@pytest.mark.parametrize(
    "comment",
    [
        pytest.param(lambda text: b"UNICODE\0" + text.encode("utf-16-le"), id="utf16-le"),
        pytest.param(lambda text: b"UNICODE\0" + text.encode("utf-16-be"), id="utf16-be"),
        pytest.param(lambda text: b"UNICODE\0" + text.encode("utf-16"), id="utf16-with-bom"),
    ],
)
@pytest.mark.parametrize("endian", ["<", ">"])
def test_the_reader_takes_either_utf16_byte_order(comment, endian: str) -> None:
    recipe = recipe_for(PROMPTS[1])
    data = jpeg_with_comment(comment(json.dumps(recipe, ensure_ascii=False)), endian)
    assert read_recipe(data) == recipe


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_transcoding_a_png_gives_the_file_of_the_image_itself(output_format: str) -> None:
    image, recipe = noise(64, 40), recipe_for(PROMPTS[0])
    png = encode_image(image, recipe, "png")
    assert transcode(png, output_format, 70) == encode_image(image, recipe, output_format, 70)
    assert transcode(png, output_format) == encode_image(image, recipe, output_format, 90)


def test_quality() -> None:
    image, recipe = noise(96, 96), recipe_for("a cat")
    for output_format in ("jpeg", "webp"):
        assert encode_image(image, recipe, output_format) == encode_image(image, recipe, output_format, 90)
        small, large = (len(encode_image(image, recipe, output_format, q)) for q in (20, 100))
        assert small < large
    for output_format, quality, message in (
        ("png", 80, "quality applies to jpeg and webp only (PNG is lossless), got quality 80"),
        ("jpeg", 0, "quality must be an integer from 1 to 100, got 0"),
        ("webp", 101, "quality must be an integer from 1 to 100, got 101"),
        ("gif", None, "format must be one of png, jpeg, webp, got 'gif'"),
    ):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            encode_image(image, recipe, output_format, quality)


def test_a_recipe_too_long_for_a_jpeg_is_refused_webp_and_png_take_it() -> None:
    recipe = recipe_for("a cat " * 6000)  # 36,000 characters: 72 KB of UTF-16, over a JPEG segment's 64 KiB
    with pytest.raises(ValueError, match="more than a JPEG holds .*write a PNG or WebP file instead"):
        encode_image(noise(), recipe, "jpeg")
    for output_format in ("webp", "png"):
        assert read_recipe(encode_image(noise(), recipe, output_format)) == recipe


def test_files_without_a_recipe_keep_their_errors(tmp_path: Path) -> None:
    plain = {}
    for output_format in FORMATS:
        buffer = io.BytesIO()
        noise().save(buffer, format=PIL_FORMATS[output_format])
        plain[output_format] = buffer.getvalue()
    cases = [
        (plain["png"], "the image holds no kandinsky22 recipe (only PNG, JPEG and WebP files written by this tool do)"),
        (plain["jpeg"], "the image holds no kandinsky22 recipe"),
        (plain["webp"], "the image holds no kandinsky22 recipe"),
        # Another generator's parameters (AUTOMATIC1111 writes text, not JSON): not a recipe, not a damaged one.
        (jpeg_with_comment(b"UNICODE\0" + "a cat\nSteps: 20".encode("utf-16-be")), "holds no kandinsky22 recipe"),
        (jpeg_with_comment(b"ASCII\0\0\0" + b'{"tool": "kandinsky22"}'), "holds no kandinsky22 recipe"),
        (jpeg_with_comment(b"UNICODE\0" + b'{"tool": "other"}'.decode().encode("utf-16-be")), "the Exif UserComment"),
        (jpeg_with_comment(b"UNICODE\0" + "{broken".encode("utf-16-be")), "the recipe in the image is not valid JSON"),
        (b"not an image", "the image is not an image file"),
        (plain["png"][:200], "the image is not a readable PNG file"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            read_recipe(data)
    (tmp_path / "plain.jpg").write_bytes(plain["jpeg"])
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'plain.jpg'}' holds no kandinsky22 recipe")):
        read_recipe(tmp_path / "plain.jpg")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_recipe(tmp_path / "missing.webp")
    with pytest.raises(ValueError, match="has no .png, .jpg, .jpeg or .webp suffix"):
        save_image(noise(), tmp_path / "cat.gif", recipe_for("a cat"))
