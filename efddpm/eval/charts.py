"""Line charts drawn with Pillow (matplotlib is not a dependency): loss curves and benchmark plots."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str, *,
               log_y: bool = False, markers: bool = False, labels: dict[str, list[str]] | None = None,
               xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
               size: tuple[int, int] = (720, 440)) -> Image.Image:
    """One line per series (name -> [(x, y), ...]), with a legend; log_y plots log10(y).

    markers: dots at the points; labels: name -> one short text per point, written beside it;
    xlim, ylim: fixed axis ranges (default: the data's, padded).
    """
    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 64, 170, 44, 44
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    plotted = {name: [(x, ty(y)) for x, y in s if (y > 0 or not log_y) and math.isfinite(y)]
               for name, s in series.items()}                               # drawable points, y on the axis' scale
    pts = [p for s in plotted.values() for p in s]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.04 or 1.0, (y1 - y0) * 0.06 or 1.0
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    if xlim is not None:
        x0, x1 = xlim
    if ylim is not None:
        y0, y1 = (ty(v) for v in ylim)

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle((left, top, w - right, h - bottom), outline=(0, 0, 0))
    for t in _ticks(x0, x1):
        X, _ = px(t, y0)
        d.line((X, h - bottom, X, h - bottom + 4), fill=(0, 0, 0))
        d.text((X - 10, h - bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in _ticks(y0, y1):
        _, Y = px(x0, t)
        d.line((left - 4, Y, left, Y), fill=(0, 0, 0))
        d.line((left + 1, Y, w - right - 1, Y), fill=(235, 235, 235))
        d.text((4, Y - 6), f"{10 ** t:.3g}" if log_y else f"{t:.3g}", fill=(0, 0, 0), font=font)
    d.text((left, 6), title, fill=(0, 0, 0), font=font)
    d.text(((left + w - right) / 2 - 3 * len(xlabel), h - 18), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top - 16), ylabel, fill=(0, 0, 0), font=font)
    for i, (name, s) in enumerate(plotted.items()):
        colour = PALETTE[i % len(PALETTE)]
        line = [px(x, y) for x, y in s]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        if markers:
            for X, Y in line:
                d.ellipse((X - 3, Y - 3, X + 3, Y + 3), fill=colour)
        for (X, Y), text in zip(line, (labels or {}).get(name, [])):
            d.text((X + 4, Y - 12), text, fill=colour, font=font)
        ly = top + 4 + 16 * i
        d.line((w - right + 10, ly + 6, w - right + 30, ly + 6), fill=colour, width=3)
        d.text((w - right + 36, ly), name, fill=(0, 0, 0), font=font)
    return img
