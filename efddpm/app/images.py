"""Images in and out: any input becomes an RGB tensor in [-1, 1] of the model's size; PNGs are written all or nothing.

Size policy (documented in the README and printed by the command line): the EXIF orientation is applied,
the central square of the picture is kept (the shorter side; the authors crop to a square too), and it is
resized with a Lanczos filter to `size` x `size`, `size` a multiple of 8 (512 for SD1.x).
"""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from efddpm.core.atomic import Outputs
from efddpm.core.checks import InputError

MAX_PIXELS = 100_000_000  # larger inputs are refused (a decompression bomb, or a mistake)


class ImageError(InputError):
    """A bad image input; the message is one line naming the problem."""


class LargeImageWarning(UserWarning):
    """An image within MAX_PIXELS but large enough for Pillow's decompression-bomb warning."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read and fully decode an image file, or raise ImageError saying why not."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said once, in our words, below
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"image too large: {path} is {img.width}x{img.height}, "
                                     f"the limit is {MAX_PIXELS:,} pixels")
                if img.width * img.height > (Image.MAX_IMAGE_PIXELS or MAX_PIXELS):
                    warnings.warn(f"{path} is {img.width}x{img.height} ({img.width * img.height / 1e6:.0f} "
                                  "megapixels): decoding it takes time and memory", LargeImageWarning, stacklevel=2)
                img.load()
                return ImageOps.exif_transpose(img)  # a decoded copy, upright
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image too large: {path}") from None
    except PermissionError:
        raise ImageError(f"image not readable (permission denied): {path}") from None
    except (Image.UnidentifiedImageError, SyntaxError):
        raise ImageError(f"not an image: {path}") from None
    except OSError as e:  # truncated or corrupted data
        raise ImageError(f"image file is damaged ({e}): {path}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency over white, 16-bit and 32-bit integers scaled to 8 bits."""
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image has zero size ({img.width}x{img.height})")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values * (255.0 if values.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int) -> tuple[Image.Image, str]:
    """The central square, resized to size x size; also a line saying what was done."""
    if size <= 0 or size % 8:
        raise ImageError(f"size must be a positive multiple of 8, got {size}")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image has warned, in one line of ours
        square = img.crop((left, top, left + side, top + side))
    out = square if side == size else square.resize((size, size), Image.Resampling.LANCZOS)
    note = f"{w}x{h}" + (f" -> central crop {side}x{side}" if w != h else "") + (f" -> resized {size}x{size}" if side != size else "")
    return out, note


def as_pil(image) -> Image.Image:
    """A path, PIL image, uint8 numpy array [H, W(, C)], or tensor [3, H, W] / [1, H, W] (uint8 0..255, or
    floating in [0, 1]) -> PIL image; anything else, NaN or out of range, raises ImageError."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageError(f"numpy images must be uint8 [H, W] or [H, W, 1|3|4], got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.numel() == 0:
            raise ImageError(f"tensor images must be [3, H, W] or [1, H, W], non-empty, got shape {list(image.shape)}")
        if image.dtype == torch.uint8:
            array = image
        elif image.is_floating_point():
            if not bool(torch.isfinite(image).all()):
                raise ImageError("the image tensor holds NaN or infinite values")
            low, high = float(image.min()), float(image.max())
            if low < -1e-6 or high > 1 + 1e-6:
                raise ImageError(f"floating image tensors must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                                 "(uint8 tensors are read as 0..255)")
            array = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        else:
            raise ImageError(f"tensor images must be uint8 or floating, got {image.dtype}")
        return Image.fromarray(array.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())
    raise ImageError(f"unsupported image type {type(image).__name__}")


def load_mask(mask, size: int) -> tuple[torch.Tensor, str]:
    """A mask (anything as_pil takes): white marks the region, transparent pixels are outside it
    -> bool [1, 1, size, size] (cropped and resized like the image), or ImageError when it marks nothing."""
    img = as_pil(mask)
    if img.mode in ("RGBA", "LA", "La", "RGBa", "P", "PA"):   # transparency: over black, so it is "not the region"
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    pixels, note = load_image(img, size)                                      # [1, 3, size, size] in [-1, 1]
    region = pixels.mean(dim=1, keepdim=True) > 0                              # brighter than mid-grey
    if not bool(region.any()):
        raise ImageError("the mask marks nothing (all black or fully transparent); white marks the region to edit")
    return region, note


def load_image(image, size: int) -> tuple[torch.Tensor, str]:
    """Anything as_pil takes -> tensor [1, 3, size, size] in [-1, 1] (float32), and a line describing the resize."""
    try:
        rgb = to_rgb(as_pil(image))
    except ValueError as e:                    # a mode Pillow cannot convert (e.g. premultiplied "La")
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"unsupported image ({e})") from None
    square, note = fit_square(rgb, size)
    return to_unit(torch.from_numpy(np.array(square)).permute(2, 0, 1)[None]), note    # [1, 3, size, size]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] in [-1, 1], the networks' range (0 -> -1, 255 -> 1), on the same
    device; contiguous (the memory layout picks the convolution kernels, hence the rounding)."""
    return (images.float() / 127.5 - 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W], clamped and rounded half up, on the same device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Tensor [B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]


def grid(images: list[Image.Image]) -> Image.Image:
    """Side by side, left to right."""
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h), (255, 255, 255))
    for i, img in enumerate(images):
        out.paste(img, (i * w, 0))
    return out


def png_writer(img: Image.Image, metadata: dict[str, str]):
    """A writer for efddpm.core.atomic.Outputs: the PNG with `metadata` as international text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)
    return lambda tmp: img.save(tmp, format="PNG", pnginfo=info)


def save_png(img: Image.Image, path: str | os.PathLike, metadata: dict[str, str], overwrite: bool = True) -> None:
    """Write one PNG with text chunks, all or nothing (efddpm.core.atomic)."""
    with Outputs(overwrite=overwrite) as out:
        out.write(path, png_writer(img, metadata))
