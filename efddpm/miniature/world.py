"""Captioned pictures of one shaded shape on a textured background, drawn with Pillow and numpy: the data of the
embedded default model (efddpm.miniature.train) and of the edit benchmark (benchmarks/edit_benchmark.py). The pixel
rules that measure an edit of them are in efddpm.miniature.pixels.

    spec = random_picture(np.random.default_rng(0))   # Picture(shape, colour, background, size, cx, cy, look)
    spec.caption                                      # "a red circle on a white background"
    img = render(spec)                                # uint8 [64, 64, 3]
    heldout_pictures(8)                               # a fixed held-out set, never drawn for training

A picture is a shape (SHAPES) of a colour word (COLOUR_RANGES), `size` pixels wide and high, centred at (cx, cy)
(64-pixel units, y down), on a background word (BACKGROUND_RANGES). The caption names the colour, shape and
background only; what it leaves free is what an edit must keep, as in a photo:
    where      the size and position (in the spec)
    how        the spec's `look`, a seed for everything else (looks(p)): the exact colour within its word's range of
               hue, saturation and value; the shading of the shape (flat, a linear gradient or a highlight); the exact
               background colour and its texture (flat, gradient, vignette, soft noise or faint clutter)
A colour word is a box in HSV, so "red" is crimson to scarlet, dark to bright. A shape's colour keeps a contrast of at
least MIN_CONTRAST (RGB distance) with its background's colour, so a picture is always legible. Two pictures with the
same look differ only in what the spec says: edit_targets(p) keeps the look, so a colour edit's target is the same
picture in another colour word. Shapes are drawn at 4x and box-filtered down, so edges are anti-aliased.

Split. A picture is held out when the CRC-32 of its shape, words, size and position is 0 mod 10 (the look plays no
part); the training sampler rejects those, the held-out sampler everything else. Both are seeded and unlimited; no
held-out picture's layout and caption ever occur in training.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_SIZE = 64   # the side of the pictures the default model was trained on (latents 16 x 16)
# The settings a model of this world recommends over the paper's, written into its file by efddpm.miniature.train (the
# shipped model carries them; Editor reads them from the file; measured in weights/MODEL_CARD.md):
#   target guidance 2.5: chosen on the validation set (held-out stream seed 1, 24 pictures, edit-friendly, skip 36)
#   by the rule "the smallest guidance of the sweep 2.5-10 at which every colour and shape edit reached its target":
#   every guidance reached every target, and the colour edits' mask IoU falls as the guidance rises (0.89 at 2.5,
#   0.88 at 3.5, 0.84 at 7.5, 0.82 at 10);
#   shifting from 50 of 100 steps: its UNet on 16x16 latents is far from shift-equivariant, and from x_T the
#   source guidance carries the shape off the shifted trajectory;
#   colour manipulation on a code inverted without guidance, at strength 1: its captions name the colour, which
#   the guidance holds against the push.
MODEL_DEFAULTS = {"target_guidance": 2.5, "shift_skip_fraction": 0.5, "colour_source_guidance": 0.0,
                  "colour_strength": 1.0}

# Colour words: (hue degrees, saturation, value) ranges, sampled uniformly. efddpm.miniature.pixels.colour_name reads
# a colour back by hue sectors wider than these boxes, so every colour drawn reads as its word.
# The shapes' words are hues and the backgrounds' are light or dark neutrals, with MIN_CONTRAST 150 between a shape
# and its background: then a colour edit's change (to the nearest colour of the new word) is smaller than the shape's
# contrast in 96% of held-out edits, where with white and black shapes, a gray background and contrast 110 it was
# 79% (recolour_within_contrast says why that decides whether any sampler can keep the shape in place; the edit
# benchmark measured mask IoU 0.85 within contrast and 0.35 beyond on the world that had them).
COLOUR_RANGES = {
    "red": ((-10, 8), (0.6, 1.0), (0.4, 1.0)),
    "orange": ((22, 36), (0.7, 1.0), (0.65, 1.0)),
    "yellow": ((48, 60), (0.65, 1.0), (0.72, 1.0)),
    "green": ((95, 150), (0.5, 1.0), (0.35, 0.95)),
    "blue": ((205, 235), (0.5, 1.0), (0.35, 1.0)),
    "purple": ((265, 285), (0.45, 1.0), (0.35, 0.9)),
    "pink": ((315, 340), (0.3, 0.65), (0.75, 1.0)),
}
BACKGROUND_RANGES = {
    "white": ((0, 360), (0.0, 0.06), (0.88, 1.0)),
    "black": ((0, 360), (0.0, 0.06), (0.0, 0.12)),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SHADINGS = ("flat", "linear", "highlight")          # of the shape
TEXTURES = ("flat", "gradient", "vignette", "noise", "clutter")   # of the background
SIZES = (20, 42)                # smallest and largest side, in pixels of the 64-pixel picture
MARGIN = 2                      # the shape keeps this far from the edges
MIN_CONTRAST = 150.0            # RGB distance (0..441) between a shape's colour and its background's
SHADING_AMOUNT = (0.08, 0.2)    # the shape's value varies by up to this fraction across it
TEXTURE_AMOUNT = (8.0, 22.0)    # the background's texture, in levels of 0..255 (clutter: the dots' contrast)
HELDOUT_MODULUS = 10            # 1 picture in 10 is held out
SUPERSAMPLE = 4


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hue in degrees, saturation and value in [0, 1] (arrays of one shape [...]) -> RGB in 0..255, [..., 3]."""
    h = np.mod(h, 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    sector = np.floor(h).astype(int) % 6
    zero = np.zeros_like(c)
    r = np.choose(sector, [c, x, zero, zero, x, c])
    g = np.choose(sector, [x, c, c, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, c, c, x])
    return 255.0 * (np.stack([r, g, b], -1) + (v - c)[..., None])


def in_range(box: tuple, u: np.ndarray) -> np.ndarray:
    """The point of an HSV box at unit coordinates u (in [0, 1]^3) -> RGB 0..255 [3]."""
    h, s, v = (lo + float(t) * (hi - lo) for (lo, hi), t in zip(box, u))
    return hsv_to_rgb(np.float64(h), np.float64(s), np.float64(v))


# Representative colours (each box's centre): for charts and for asking the colour manipulation for a word.
COLOURS = {c: tuple(int(round(x)) for x in in_range(box, np.full(3, 0.5))) for c, box in COLOUR_RANGES.items()}
BACKGROUNDS = {c: tuple(int(round(x)) for x in in_range(box, np.full(3, 0.5))) for c, box in BACKGROUND_RANGES.items()}


@dataclass(frozen=True)
class Picture:
    shape: str
    colour: str
    background: str
    size: int      # side of the shape's bounding box, pixels (64-pixel units)
    cx: int        # centre, pixels from the left
    cy: int        # centre, pixels from the top
    look: int = 0  # seed of what the caption leaves free (looks)

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def split(self) -> str:
        key = f"{self.shape},{self.colour},{self.background},{self.size},{self.cx},{self.cy}"
        return "heldout" if zlib.crc32(key.encode()) % HELDOUT_MODULUS == 0 else "train"


def caption(colour: str, shape: str, background: str) -> str:
    """ "a red circle on a white background", "an orange star on a black background"."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Look:
    """What a picture's caption leaves free, drawn from its `look` seed."""
    colour_rgb: tuple[float, float, float]       # the shape's base colour, 0..255
    background_rgb: tuple[float, float, float]   # the background's base colour, 0..255
    shading: str                                 # SHADINGS
    shading_amount: float                        # fraction of the value
    angle: float                                 # radians: direction of the gradients, where the highlight sits
    texture: str                                 # TEXTURES
    texture_amount: float                        # levels
    texture_seed: int


def looks(p: Picture) -> Look:
    """The look of picture p: a function of p.look and p's colour and background words only."""
    rng = np.random.default_rng([0x100C, p.look])
    background = in_range(BACKGROUND_RANGES[p.background], rng.random(3))
    shading, texture = str(rng.choice(SHADINGS)), str(rng.choice(TEXTURES))
    amounts, angles, texture_seed = rng.uniform(0, 1, 2), float(rng.uniform(0, 2 * math.pi)), int(rng.integers(2 ** 31))
    colour = in_range(COLOUR_RANGES[p.colour], rng.random(3))
    for _ in range(200):   # the first colour of the word legible on this background
        if np.linalg.norm(colour - background) >= MIN_CONTRAST:
            break
        colour = in_range(COLOUR_RANGES[p.colour], rng.random(3))
    else:
        raise ValueError(f"no {p.colour} is legible on this {p.background} background")
    lerp = lambda bounds, t: bounds[0] + t * (bounds[1] - bounds[0])  # noqa: E731
    return Look(tuple(colour.tolist()), tuple(background.tolist()), shading,
                0.0 if shading == "flat" else float(lerp(SHADING_AMOUNT, amounts[0])), angles, texture,
                0.0 if texture == "flat" else float(lerp(TEXTURE_AMOUNT, amounts[1])), texture_seed)


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


def draw_outline(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw `shape` filling the box (x0, y0, x1, y1) (edges, in canvas pixels)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in OUTLINES[shape]], fill=fill)


def coverage(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """float [H, W] in [0, 1]: the fraction of each pixel that `shape`, filling box (x0, y0, x1, y1), covers
    (drawn at SUPERSAMPLE x and box-filtered)."""
    h, w = size
    s = SUPERSAMPLE
    img = Image.new("L", (w * s, h * s), 0)
    draw_outline(ImageDraw.Draw(img), shape, tuple(v * s for v in box), 255)
    return np.asarray(img.reduce(s), np.float32) / 255


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (x, y), 64-pixel units, each [size, size]."""
    c = (np.arange(size) + 0.5) * DEFAULT_SIZE / size
    return np.meshgrid(c, c)


def background_field(p: Picture, size: int = DEFAULT_SIZE) -> np.ndarray:
    """float [size, size, 3], 0..255: the background of p, its base colour plus its texture (the same offset on all
    three channels), before rounding."""
    look = looks(p)
    x, y = _grid(size)
    u, v = (x - DEFAULT_SIZE / 2) / (DEFAULT_SIZE / 2), (y - DEFAULT_SIZE / 2) / (DEFAULT_SIZE / 2)    # [-1, 1]
    rng = np.random.default_rng(look.texture_seed)
    a = look.texture_amount
    towards_middle = 1.0 if np.mean(look.background_rgb) < 128 else -1.0    # brighten dark, darken light
    if look.texture == "gradient":
        t = a * (u * math.cos(look.angle) + v * math.sin(look.angle)) / math.sqrt(2)
    elif look.texture == "vignette":
        t = towards_middle * a * (u ** 2 + v ** 2) / 2
    elif look.texture == "noise":   # smooth noise: a 5 x 5 grid of values in [-1, 1], bicubic
        coarse = Image.fromarray(rng.uniform(-1, 1, (5, 5)).astype(np.float32), mode="F")
        t = a * np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float64).clip(-1, 1)
    elif look.texture == "clutter":  # faint dots, 1.5-3.5 px across
        t = np.zeros((size, size))
        for _ in range(int(rng.integers(3, 9))):
            cx, cy, r = rng.uniform(0, DEFAULT_SIZE, 2).tolist() + [float(rng.uniform(0.75, 1.75))]
            t += towards_middle * a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r ** 2))
    else:
        t = np.zeros((size, size))
    return np.asarray(look.background_rgb) + t[..., None]


def shape_field(p: Picture, colour_rgb=None, size: int = DEFAULT_SIZE) -> np.ndarray:
    """float [size, size, 3], 0..255: the shape's colour at every pixel (its base colour, or colour_rgb, with its
    value shaded over the shape's box), before it is cut out by its coverage."""
    look = looks(p)
    base = np.asarray(look.colour_rgb if colour_rgb is None else colour_rgb, np.float64)
    x, y = _grid(size)
    u, v = (x - p.cx) / (p.size / 2), (y - p.cy) / (p.size / 2)               # [-1, 1] over the box
    if look.shading == "linear":
        m = 1 + look.shading_amount * (u * math.cos(look.angle) + v * math.sin(look.angle)) / math.sqrt(2)
    elif look.shading == "highlight":   # brightest at a point half-way to the box's edge, darker away from it
        hx, hy = 0.5 * math.cos(look.angle), 0.5 * math.sin(look.angle)
        m = 1 + look.shading_amount * (0.5 - np.sqrt((u - hx) ** 2 + (v - hy) ** 2).clip(0, 1.5)) / 1.0
    else:
        m = np.ones_like(u)
    return (base * m[..., None]).clip(0, 255)        # scaling RGB scales the value, keeps hue and saturation


def render(p: Picture, size: int = DEFAULT_SIZE, *, colour_rgb=None) -> np.ndarray:
    """The picture as uint8 [size, size, 3]; colour_rgb (0..255) replaces its look's shape colour."""
    s = size / DEFAULT_SIZE
    half = p.size / 2
    alpha = coverage(p.shape, ((p.cx - half) * s, (p.cy - half) * s, (p.cx + half) * s, (p.cy + half) * s),
                     (size, size))[..., None]                                        # [size, size, 1]
    img = (1 - alpha) * background_field(p, size) + alpha * shape_field(p, colour_rgb, size)
    return np.rint(img.clip(0, 255)).astype(np.uint8)


def render_background(p: Picture, size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: the picture without its shape (what efddpm.miniature.pixels measures a shape against)."""
    return np.rint(background_field(p, size).clip(0, 255)).astype(np.uint8)


def render_many(pictures: list[Picture], size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [N, size, size, 3]."""
    return np.stack([render(p, size) for p in pictures])


# ---------------------------------------------------------------------------------------------
# Sampling, with the held-out split
# ---------------------------------------------------------------------------------------------

def random_picture(rng: np.random.Generator, split: str = "train") -> Picture:
    """One picture of `split` ("train" or "heldout"), uniform over shapes, colours, backgrounds,
    sizes, positions that keep the shape MARGIN from the edges, and looks."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    while True:
        background = str(rng.choice(list(BACKGROUND_RANGES)))
        colour = str(rng.choice(list(COLOUR_RANGES)))
        side = int(rng.integers(SIZES[0], SIZES[1] + 1))
        lo, hi = MARGIN + math.ceil(side / 2), DEFAULT_SIZE - MARGIN - math.ceil(side / 2)
        p = Picture(str(rng.choice(SHAPES)), colour, background, side,
                    int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)), int(rng.integers(2 ** 31)))
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
    """(colour edit, shape edit) of a picture: another colour word, another shape; drawn from a
    generator seeded by the picture and `seed`. Only the colour word or the shape changes in the spec (the look stays)."""
    rng = np.random.default_rng([seed, zlib.crc32(repr(p).encode())])
    colour = str(rng.choice([c for c in COLOUR_RANGES if c != p.colour]))
    shape = str(rng.choice([s for s in SHAPES if s != p.shape]))
    return Picture(p.shape, colour, p.background, p.size, p.cx, p.cy, p.look), \
        Picture(shape, p.colour, p.background, p.size, p.cx, p.cy, p.look)


def nearest_in_range(rgb, colour: str, steps: int = 9) -> np.ndarray:
    """The colour of word `colour` nearest to rgb (RGB distance), searched on a steps^3 grid of its HSV box: [3]."""
    t = np.linspace(0, 1, steps)
    (h0, h1), (s0, s1), (v0, v1) = COLOUR_RANGES[colour]
    h, s, v = np.meshgrid(h0 + t * (h1 - h0), s0 + t * (s1 - s0), v0 + t * (v1 - v0))
    grid = hsv_to_rgb(h, s, v).reshape(-1, 3)                                     # [steps^3, 3]
    return grid[np.argmin(np.linalg.norm(grid - np.asarray(rgb, np.float64), axis=1))]


def recolour_within_contrast(p: Picture, target: Picture) -> bool:
    """Whether a colour edit can keep the shape where it is: the colour change (RGB distance from p's colour to the
    nearest colour of the target's word) is smaller than the shape's contrast with its background.

    In pixels (sum of squared differences), recolouring a pixel of the shape costs the colour change and turning it into
    background costs the contrast; so when this holds, the picture with the target's caption nearest to p is the
    recoloured shape in place, and when it does not, a smaller shape (inside p's, or elsewhere). A sampler that
    follows the target caption is pulled towards the nearest such picture (tests/test_world.py checks this by brute
    force)."""
    look = looks(p)
    colour, background = np.asarray(look.colour_rgb), np.asarray(look.background_rgb)
    change = np.linalg.norm(nearest_in_range(colour, target.colour) - colour)
    return bool(change < np.linalg.norm(colour - background))


def within_contrast_pictures(n: int, seed: int = 0) -> list[Picture]:
    """The first n held-out pictures (the stream seeded by `seed`) whose colour edit (edit_targets with `seed`) is
    within contrast."""
    within = (p for p in stream(seed, "heldout") if recolour_within_contrast(p, edit_targets(p, seed)[0]))
    return [next(within) for _ in range(n)]
