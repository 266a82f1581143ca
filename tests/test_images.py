"""Image input: every mode becomes RGB, EXIF orientation is applied, the crop/resize policy is as documented."""
import numpy as np
import pytest
import torch
from PIL import Image

from efddpm.app.images import ImageError, fit_square, load_image, open_image, save_png, to_pil, to_rgb


def rgb_of(img: Image.Image) -> tuple[int, int, int]:
    return to_rgb(img).getpixel((0, 0))


def test_modes_become_rgb():
    assert rgb_of(Image.new("RGB", (4, 4), (10, 200, 30))) == (10, 200, 30)
    assert rgb_of(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    assert rgb_of(Image.new("RGBA", (4, 4), (255, 0, 0, 0))) == (255, 255, 255)  # transparent: white background
    assert rgb_of(Image.new("RGBA", (4, 4), (255, 0, 0, 255))) == (255, 0, 0)
    assert rgb_of(Image.new("LA", (4, 4), (0, 255))) == (0, 0, 0)
    assert rgb_of(Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)) == (10, 200, 30)
    assert rgb_of(Image.new("RGB", (4, 4), (10, 200, 30)).convert("CMYK")) == (10, 200, 30)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)  # half of 65535
    assert rgb_of(open_image(path)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = open_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((10, 3))  # the blue band is now on top
    assert b > 200 and r < 60


def test_central_square_then_resize_policy():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # the central square is white
    out, note = fit_square(img, 64)
    assert out.size == (64, 64) and note == "300x100 -> central crop 100x100 -> resized 64x64"
    assert np.asarray(out).min() == 255
    assert fit_square(Image.new("RGB", (64, 64)), 64)[1] == "64x64"
    with pytest.raises(ImageError, match="multiple of 8"):
        fit_square(img, 60)


def test_tensor_round_trip_and_range():
    img = Image.fromarray(np.arange(48 * 48 * 3, dtype=np.uint8).reshape(48, 48, 3))
    pixels, _ = load_image(img, 48)
    assert pixels.shape == (1, 3, 48, 48) and pixels.dtype == torch.float32
    assert -1 <= pixels.min() and pixels.max() <= 1
    assert np.array_equal(np.asarray(to_pil(pixels)[0]), np.asarray(img))


def test_save_png_is_atomic_and_keeps_text(tmp_path):
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (8, 8)), path, {"efddpm": '{"seed": 1}'})
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left
    with Image.open(path) as img:
        assert img.text["efddpm"] == '{"seed": 1}'
