"""The paper's image shifting and colour manipulation on the shipped shapes model (Editor.shift, Editor.recolor).

The model's latents are 16x16 for 64x64 pictures, so d latent pixels are 4 d image pixels. Measured on this model
(float32, CPU, torch 2.13, inversion seed 0, 100 steps), with the settings of the tests below:
    shift, source guidance 3.5, regenerated from 50 of 100 steps (the model's shift_skip_fraction 0.5): the
    shape's centroid moved by 4 d within 0.12, 0.45, 0.32 px (threshold 2); mask IoU with the shape drawn
    shifted 0.98, 0.96, 0.97 (threshold 0.75). From x_T (skip 0, the paper's) the same shifts missed by 14.8,
    14.5 and 6.7 px.
    recolor, a code inverted with source guidance 0 (the model's colour_source_guidance), s = 1 (its
    colour_strength), t in 1..40: median colour inside the shape 3 and 3 from the target (RGB distance,
    threshold 60; the input's colour is 268 and 267 away); outside the mask grown by 4 px (one
    latent pixel) the picture is the plain reconstruction's up to the texture's re-rendering: mean abs difference
    1.57 and 0.62, max 7 and 4 (of 255; thresholds 4 and 30). With the code's source guidance at 3.5 (the
    paper's) the circle's colour landed 26 from the target (35, 83, 237) at s = 1.
"""
import numpy as np
import pytest
from PIL import Image

from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.miniature import pixels, world
from efddpm.app.editor import Editor

from inversion_util import one_thread  # noqa: F401  (autouse fixture: one thread)

MODEL = DEFAULT_MODEL
SHIFT_SKIP_FRACTION = 0.5      # what the model's file recommends (see test_the_model_recommends_these_settings)
COLOUR_SOURCE_GUIDANCE = 0.0
COLOUR_STRENGTH = 1.0

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not present")


@pytest.fixture(scope="module")
def editor():
    return Editor.from_pretrained(str(MODEL))


def mask_image(mask: np.ndarray) -> Image.Image:
    """bool [H, W] -> the white-on-black mask picture Editor.recolor takes."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def test_the_model_recommends_these_settings(editor):
    """The shipped file carries the manipulations' settings that the tests below use."""
    defaults = editor.models.defaults
    assert defaults.get("shift_skip_fraction") == SHIFT_SKIP_FRACTION
    assert defaults.get("colour_source_guidance") == COLOUR_SOURCE_GUIDANCE
    assert editor.colour_strength == COLOUR_STRENGTH


def test_the_manipulations_read_the_model_defaults(editor, monkeypatch):
    """Without the model's keys, the paper's settings: shifting regenerates from x_T (all N steps); with them,
    from shift_skip_fraction of N, and recolor warns about a code inverted with more source guidance than
    colour_source_guidance."""
    picture = world.Picture("circle", "red", "white", 24, 24, 28)
    img = world.render(picture)
    code = editor.invert(img, picture.caption, steps=10, seed=0)       # source guidance 3.5
    for defaults, calls_wanted in (({}, 10), ({"shift_skip_fraction": 0.5}, 5)):
        monkeypatch.setattr(editor.models, "defaults", defaults)
        calls = []
        editor.shift(code, 0, 1, progress=calls.append)
        assert len(calls) == calls_wanted                              # UNet calls: steps - skip
    monkeypatch.setattr(editor.models, "defaults", {"colour_source_guidance": 0.0})
    with pytest.warns(UserWarning, match="inverted with source guidance 3.5"):
        editor.recolor(code, img, mask_image(pixels.shape_mask(img, world.render_background(picture))), (0, 0, 1))


@pytest.mark.parametrize("picture, dy, dx", [
    (world.Picture("circle", "red", "white", 24, 24, 28), 0, 4),      # 16 px right
    (world.Picture("square", "blue", "black", 20, 20, 40), -3, 0),     # 12 px up
    (world.Picture("diamond", "pink", "white", 30, 30, 34), 0, 3),    # 12 px right
])
def test_shift_moves_the_shape_by_four_pixels_per_latent_pixel(editor, picture, dy, dx):
    img = world.render(picture)
    code = editor.invert(img, picture.caption, seed=0)                  # source guidance 3.5, as `efddpm shift`
    out = np.asarray(editor.shift(code, dy, dx, skip=round(SHIFT_SKIP_FRACTION * code.num_steps)))
    background = world.render_background(picture)
    mask = pixels.shape_mask(out, background)
    (x0, y0), (x1, y1) = pixels.centroid(pixels.shape_mask(img, background)), pixels.centroid(mask)
    moved = np.array([x1 - x0, y1 - y0])
    print(f"\n{picture.caption}, shift ({dy}, {dx}): centroid moved ({moved[0]:+.2f}, {moved[1]:+.2f}) px")
    assert np.hypot(*(moved - [4 * dx, 4 * dy])) < 2.0                # measured 0.12, 0.45, 0.32 px
    assert pixels.shape_colour(out, mask) == picture.colour
    moved_picture = world.Picture(picture.shape, picture.colour, picture.background, picture.size,
                                  picture.cx + 4 * dx, picture.cy + 4 * dy, picture.look)
    iou = pixels.iou(mask, pixels.shape_mask(world.render(moved_picture), world.render_background(moved_picture)))
    print(f"IoU with the shape drawn shifted {iou:.2f}")
    assert iou > 0.75                                                   # measured 0.98, 0.96, 0.97


@pytest.mark.parametrize("picture, rgb", [
    (world.Picture("circle", "red", "white", 24, 24, 28), (32, 64, 255)),          # "#2040ff" of issue #11
    (world.Picture("square", "blue", "black", 20, 20, 40), world.COLOURS["yellow"]),
])
def test_recolor_reaches_the_colour_inside_the_mask_and_keeps_the_rest(editor, picture, rgb):
    img = world.render(picture)
    shape = pixels.shape_mask(img, world.render_background(picture))
    mask = pixels.dilate(shape, 1)                                     # the shape and its anti-aliased edge
    code = editor.invert(img, picture.caption, guidance=COLOUR_SOURCE_GUIDANCE, seed=0)
    out = np.asarray(editor.recolor(code, img, mask_image(mask), tuple(c / 255 for c in rgb),
                                    strength=COLOUR_STRENGTH)).astype(float)
    plain = editor.decode(code.xts[0])[0]                               # the regeneration without the push: x_0
    plain = ((plain.permute(1, 2, 0) + 1) * 127.5).round().numpy()
    inside = np.median(out[pixels.erode(shape, 2)], axis=0)
    outside = np.abs(out - plain)[~pixels.dilate(mask, 4)]
    print(f"\n{picture.caption} -> {rgb}: median inside {inside.round()}, RGB distance "
          f"{np.linalg.norm(inside - rgb):.0f}; outside |diff| mean {outside.mean():.2f}, max {outside.max():.0f}")
    assert np.linalg.norm(inside - rgb) < 60                            # measured 3, 3 (the input: 268, 267)
    assert outside.mean() < 4.0                                          # measured 1.57, 0.62 (of 255)
    assert outside.max() < 30                                            # measured 7, 4
