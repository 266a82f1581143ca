"""Captioned pictures of one flat shape on a flat background, drawn with Pillow, and the pixel rules
that measure an edit of them. The data of the embedded default model (efddpm.miniature.train) and of the edit
benchmark (benchmarks/edit_benchmark.py).

    spec = random_picture(np.random.default_rng(0))      # Picture(shape, colour, background, size, cx, cy)
    spec.caption                                         # "a red circle on a white background"
    img = render(spec)                                   # uint8 [64, 64, 3]
    heldout_pictures(8)                                  # a fixed held-out set, never drawn for training

A picture is a shape (SHAPES) in a colour (COLOURS), `size` pixels wide and high, centred at (cx, cy)
(64-pixel units, y down), on a background colour (BACKGROUNDS). Captions name the colour, shape and
background only: position and size are left to the noise, which is what edits must keep.
Drawn at 4x and box-filtered down, so edges are anti-aliased.

Split. A picture is held out when the CRC-32 of its parameters is 0 mod 10; the training sampler
rejects those, the held-out sampler everything else. Both are seeded and unlimited; no held-out
picture is ever a training picture.

Measurements (numpy, uint8 images [H, W, 3], bool masks [H, W]):
    shape_mask     pixels farther than MASK_THRESHOLD from the background colour (RGB distance)
    shape_colour   nearest named colour (COLOURS + gray) to the median colour under the mask
    shape_class    the shape whose drawing, stretched to the bounding box of the mask (specks removed),
                   overlaps it best (IoU)
    box, box_iou   bounding box of the mask (specks removed), and the IoU of two boxes: position and size,
                   whatever the shape
    iou, centroid, background_kept
"""
from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_SIZE = 64   # the side of the pictures the default model was trained on (latents 16 x 16)
# The settings a model of this world recommends over the paper's, written into its file by efddpm.miniature.train (the
# shipped model carries them; Editor reads them from the file; measured in weights/MODEL_CARD.md):
#   target guidance 7.5: at SD's 15 its edits over-saturate;
#   shifting from 50 of 100 steps: its UNet on 16x16 latents is far from shift-equivariant, and from x_T the
#   source guidance carries the shape off the shifted trajectory;
#   colour manipulation on a code inverted without guidance, at strength 1: its captions name the colour, which
#   the guidance holds against the push.
MODEL_DEFAULTS = {"target_guidance": 7.5, "shift_skip_fraction": 0.5, "colour_source_guidance": 0.0,
                  "colour_strength": 1.0}

COLOURS = {  # shape colours, RGB
    "red": (225, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (250, 220, 30),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "purple": (135, 45, 190),
    "pink": (250, 120, 200),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
NAMED = COLOURS | BACKGROUNDS   # every colour a shape_colour() answer can be
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = (18, 40)                # smallest and largest side, in pixels of the 64-pixel picture
MARGIN = 2                      # the shape keeps this far from the edges
HELDOUT_MODULUS = 10            # 1 picture in 10 is held out
SUPERSAMPLE = 4
MASK_THRESHOLD = 48.0           # RGB distance (0..441) from the background that counts as shape


@dataclass(frozen=True)
class Picture:
    shape: str
    colour: str
    background: str
    size: int     # side of the shape's bounding box, pixels (64-pixel units)
    cx: int       # centre, pixels from the left
    cy: int       # centre, pixels from the top

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def split(self) -> str:
        key = f"{self.shape},{self.colour},{self.background},{self.size},{self.cx},{self.cy}"
        return "heldout" if zlib.crc32(key.encode()) % HELDOUT_MODULUS == 0 else "train"


def caption(colour: str, shape: str, background: str) -> str:
    """ "a red circle on a white background", "an orange star on a gray background"."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on a {background} background"


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.382) -> list[tuple[float, float]]:
    """A regular star, first point up, in its own bounding box scaled to [0, 1]^2."""
    pts = [((1.0 if k % 2 == 0 else inner) * math.cos(math.pi * (k / points - 0.5)),
            (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * (k / points - 0.5))) for k in range(2 * points)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


_A, _B = 1 / 3, 2 / 3
OUTLINES = {  # polygons in the unit bounding box [0, 1]^2, y down; the circle is an ellipse instead
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _star(),
    "cross": [(_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B), (_B, 1), (_A, 1), (_A, _B), (0, _B),
              (0, _A), (_A, _A)],
}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw `shape` filling the box (x0, y0, x1, y1) (edges, in canvas pixels)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in OUTLINES[shape]], fill=fill)


def render(p: Picture, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The picture as uint8 [size, size, 3] (drawn at SUPERSAMPLE x and box-filtered)."""
    s = size * SUPERSAMPLE / DEFAULT_SIZE  # canvas pixels per 64-pixel unit
    img = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUNDS[p.background])
    half = p.size / 2
    _draw(ImageDraw.Draw(img), p.shape, ((p.cx - half) * s, (p.cy - half) * s, (p.cx + half) * s, (p.cy + half) * s),
          COLOURS[p.colour])
    return np.array(img.reduce(SUPERSAMPLE))


def render_many(pictures: list[Picture], size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [N, size, size, 3]."""
    return np.stack([render(p, size) for p in pictures])


# ---------------------------------------------------------------------------------------------
# Sampling, with the held-out split
# ---------------------------------------------------------------------------------------------

def random_picture(rng: np.random.Generator, split: str = "train") -> Picture:
    """One picture of `split` ("train" or "heldout"), uniform over shapes, colours other than the
    background, backgrounds, sizes and positions that keep the shape MARGIN from the edges."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    while True:
        background = str(rng.choice(list(BACKGROUNDS)))
        colour = str(rng.choice([c for c in COLOURS if c != background]))
        side = int(rng.integers(SIZES[0], SIZES[1] + 1))
        lo, hi = MARGIN + math.ceil(side / 2), DEFAULT_SIZE - MARGIN - math.ceil(side / 2)
        p = Picture(str(rng.choice(SHAPES)), colour, background, side,
                    int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
        if p.split == split:
            return p


def pictures(n: int, seed: int = 0, split: str = "train") -> list[Picture]:
    """n pictures of `split` from the stream seeded by `seed` (the same n, seed: the same list)."""
    return list(stream(seed, split, n))


def stream(seed: int = 0, split: str = "train", n: int | None = None) -> Iterator[Picture]:
    """Pictures of `split`, unlimited when n is None."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    i = 0
    while n is None or i < n:
        yield random_picture(rng, split)
        i += 1


def heldout_pictures(n: int, seed: int = 0) -> list[Picture]:
    """The fixed held-out set used by the tests and the benchmark."""
    return pictures(n, seed, "heldout")


def edit_targets(p: Picture, seed: int = 0) -> tuple[Picture, Picture]:
    """(colour edit, shape edit) of a picture: another colour (not the background's), another shape;
    drawn from a generator seeded by the picture and `seed`. Only colour/shape change in the spec."""
    rng = np.random.default_rng([seed, zlib.crc32(repr(p).encode())])
    colour = str(rng.choice([c for c in COLOURS if c not in (p.colour, p.background)]))
    shape = str(rng.choice([s for s in SHAPES if s != p.shape]))
    return Picture(p.shape, colour, p.background, p.size, p.cx, p.cy), \
        Picture(shape, p.colour, p.background, p.size, p.cx, p.cy)


def recolour_within_contrast(p: Picture, target: Picture) -> bool:
    """Whether a colour edit can keep the shape where it is: the colour change (RGB distance from p's colour to
    the target's) is smaller than the shape's contrast with its background.

    Flat pictures make this exact: among the pictures with the target's caption, the one nearest to p in pixels
    is the recoloured shape in place when this holds; when it does not, recolouring all of the shape costs more
    than turning most of it into background, and the nearest is a much smaller shape (inside p's, or elsewhere).
    A sampler that follows its target caption is then pulled towards a smaller or moved shape."""
    colour, new, background = (np.asarray(NAMED[c], np.float64) for c in (p.colour, target.colour, p.background))
    return bool(np.linalg.norm(new - colour) < np.linalg.norm(colour - background))


def within_contrast_pictures(n: int, seed: int = 0) -> list[Picture]:
    """The first n held-out pictures (the stream seeded by `seed`) whose colour edit (edit_targets with `seed`) is
    within contrast."""
    within = (p for p in stream(seed, "heldout") if recolour_within_contrast(p, edit_targets(p, seed)[0]))
    return [next(within) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Pixel rules
# ---------------------------------------------------------------------------------------------

def shape_mask(img: np.ndarray, background: str | tuple[int, int, int]) -> np.ndarray:
    """bool [H, W]: pixels whose RGB distance from the background colour exceeds MASK_THRESHOLD."""
    bg = np.asarray(BACKGROUNDS[background] if isinstance(background, str) else background, np.float32)
    return np.linalg.norm(img.astype(np.float32) - bg, axis=-1) > MASK_THRESHOLD


def shape_colour(img: np.ndarray, mask: np.ndarray) -> str | None:
    """The named colour (COLOURS and BACKGROUNDS) nearest to the median colour under the mask;
    None for an empty mask."""
    if not mask.any():
        return None
    median = np.median(img[mask].astype(np.float32), axis=0)  # [3]
    names = list(NAMED)
    return names[int(np.argmin([np.linalg.norm(median - np.asarray(NAMED[c], np.float32)) for c in names]))]


def _window(mask: np.ndarray, r: int, outside: bool) -> np.ndarray:
    """The (2r+1)^2 shifted copies of mask [H, W], stacked [(2r+1)^2, H, W]; `outside` fills the border."""
    p = np.pad(mask, r, constant_values=outside)
    h, w = mask.shape
    return np.stack([p[r + dy:r + dy + h, r + dx:r + dx + w] for dy in range(-r, r + 1) for dx in range(-r, r + 1)])


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """bool [H, W] grown by r pixels (square structuring element)."""
    return _window(mask, r, False).any(axis=0)


def erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """bool [H, W] shrunk by r pixels (square structuring element; the canvas edge does not erode)."""
    return _window(mask, r, True).all(axis=0)


def outline_mask(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: `shape` drawn to fill box (x0, y0, x1, y1) at SUPERSAMPLE x, covered >= half."""
    h, w = size
    s = SUPERSAMPLE
    img = Image.new("L", (w * s, h * s), 0)
    _draw(ImageDraw.Draw(img), shape, tuple(v * s for v in box), 255)
    return np.asarray(img.reduce(s)) >= 128


def without_specks(mask: np.ndarray) -> np.ndarray:
    """Opening by reconstruction: the parts of mask connected to what survives a 3x3 erosion
    (specks one or two pixels wide go, thin tips of the shape stay)."""
    m = erode(mask)
    while True:
        grown = dilate(m) & mask
        if (grown == m).all():
            return m
        m = grown


def shape_class(mask: np.ndarray) -> tuple[str | None, float]:
    """(shape, IoU): the shape of SHAPES whose outline, stretched to the bounding box of the mask
    without specks, overlaps it best, with that IoU. (None, 0.0) for an empty mask."""
    m = without_specks(mask)
    if not m.any():
        return None, 0.0
    ys, xs = np.nonzero(m)
    bounds = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    scores = {s: iou(m, outline_mask(s, bounds, m.shape)) for s in SHAPES}
    best = max(scores, key=scores.get)
    return best, scores[best]


def box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), edges in pixels, of the mask without specks; None when empty."""
    m = without_specks(mask)
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: tuple | None, b: tuple | None) -> float:
    """IoU of two boxes (x0, y0, x1, y1); 0 when either is None."""
    if a is None or b is None:
        return 0.0
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) mean position of the mask's pixels; (nan, nan) when empty."""
    if not mask.any():
        return math.nan, math.nan
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def background_kept(img: np.ndarray, source_mask: np.ndarray, background: str, margin: int = 2) -> float:
    """Fraction of the source's background (pixels farther than `margin` from the source shape)
    that is still background in img (within MASK_THRESHOLD of the background colour)."""
    region = ~dilate(source_mask, margin)
    return float((~shape_mask(img, background))[region].mean()) if region.any() else 1.0
