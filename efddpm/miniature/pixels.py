"""The pixel rules that read the colour, shape, place and background of a picture of efddpm.miniature.world, and so
measure an edit of one (efddpm.miniature.measure). numpy; uint8 images [H, W, 3], bool masks [H, W].

    shape_mask         pixels farther than MASK_THRESHOLD (RGB distance) from the background: the picture's own
                       (world.render_background) for an edit of a known picture, estimate_background's for a sample
    colour_name        the colour word of an RGB colour, by hue sectors (wider than world.COLOUR_RANGES' boxes)
    shape_colour       colour_name of the median colour under the mask
    shape_class        the shape whose drawing, stretched to the bounding box of the mask (specks removed),
                       overlaps it best (IoU)
    box, box_iou       bounding box of the mask (specks removed), and the IoU of two boxes: position and size,
                       whatever the shape
    iou, centroid, background_kept
"""
from __future__ import annotations

import math

import numpy as np

from efddpm.miniature import world

MASK_THRESHOLD = 48.0      # RGB distance (0..441) from the background that counts as shape
# colour_name: value below BLACK_VALUE is black; saturation below GREY_SATURATION is white (value above WHITE_VALUE) or
# gray; otherwise the hue sector, degrees [from, to)
BLACK_VALUE, GREY_SATURATION, WHITE_VALUE = 0.28, 0.2, 0.75
HUE_SECTORS = (("red", -15, 15), ("orange", 15, 42), ("yellow", 42, 75), ("green", 75, 180), ("blue", 180, 250),
               ("purple", 250, 300), ("pink", 300, 345))


def colour_name(rgb) -> str:
    """The colour word of an RGB colour in 0..255 [3]: a hue of world.COLOUR_RANGES, or white, gray or black."""
    r, g, b = (float(c) / 255 for c in rgb)
    v, lo = max(r, g, b), min(r, g, b)
    s = (v - lo) / v if v > 0 else 0.0
    if v < BLACK_VALUE:
        return "black"
    if s < GREY_SATURATION:
        return "white" if v > WHITE_VALUE else "gray"
    c = v - lo
    hue = 60 * (((g - b) / c) % 6 if v == r else (b - r) / c + 2 if v == g else (r - g) / c + 4)
    hue = hue - 360 if hue >= 345 else hue
    return next(name for name, a, z in HUE_SECTORS if a <= hue < z)


def shape_mask(img: np.ndarray, background) -> np.ndarray:
    """bool [H, W]: pixels whose RGB distance from the background (uint8 [H, W, 3], or one colour [3]) exceeds
    MASK_THRESHOLD."""
    bg = np.asarray(background, np.float32)
    return np.linalg.norm(img.astype(np.float32) - bg, axis=-1) > MASK_THRESHOLD


def estimate_background(img: np.ndarray, border: int = world.MARGIN) -> np.ndarray:
    """float [H, W, 3]: a plane a + b x + c y per channel, fitted (least squares) to the outer `border` pixels, which a
    shape never covers: the background of a picture whose own is not known (a sample)."""
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w]
    ring = np.ones((h, w), bool)
    ring[border:h - border, border:w - border] = False
    design = np.stack([np.ones(h * w), x.ravel() / w, y.ravel() / h], 1)            # [H*W, 3]
    coef, *_ = np.linalg.lstsq(design[ring.ravel()], img.reshape(-1, 3)[ring.ravel()].astype(np.float64), rcond=None)
    return (design @ coef).reshape(h, w, 3)


def shape_colour(img: np.ndarray, mask: np.ndarray) -> str | None:
    """colour_name of the median colour under the mask; None for an empty mask."""
    if not mask.any():
        return None
    return colour_name(np.median(img[mask].astype(np.float32), axis=0))


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
    """bool [H, W]: `shape` drawn to fill box (x0, y0, x1, y1), pixels covered at least half."""
    return world.coverage(shape, box, size) >= 0.5


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
    """(shape, IoU): the shape of world.SHAPES whose outline, stretched to the bounding box of the mask without specks,
    overlaps it best, with that IoU. (None, 0.0) for an empty mask."""
    m = without_specks(mask)
    if not m.any():
        return None, 0.0
    ys, xs = np.nonzero(m)
    bounds = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    scores = {s: iou(m, outline_mask(s, bounds, m.shape)) for s in world.SHAPES}
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


def background_kept(img: np.ndarray, source_mask: np.ndarray, background, margin: int = 2) -> float:
    """Fraction of the source's background (pixels farther than `margin` from the source shape) that is still
    background in img (within MASK_THRESHOLD of `background`, as for shape_mask)."""
    region = ~dilate(source_mask, margin)
    return float((~shape_mask(img, background))[region].mean()) if region.any() else 1.0
