"""What the embedded model does, measured for its model card (weights/MODEL_CARD.md): the VAE on held-out pictures,
samples against their captions, and exact reconstruction through edit-friendly inversion. Float32; the pixel rules of
efddpm.miniature.pixels read every picture.

    python benchmarks/embedded_model.py                       # the shipped model, ~1 min on a 2-core CPU
    python benchmarks/embedded_model.py --model /tmp/m.safetensors --device cuda

Prints one block of figures; the samples are read against a background estimated from their border
(pixels.estimate_background), since a sample has no source picture.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from efddpm import load
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.app.images import to_uint8, to_unit
from efddpm.app.networks import decode_latents, encode_pictures
from efddpm.method.inversion import regenerate
from efddpm.miniature import pixels, world
from efddpm.miniature.measure import EditSet
from efddpm.miniature.train import sample


def vae_figures(models, pics: list[world.Picture]) -> dict:
    """Reconstruction of held-out pictures through the VAE (posterior mode): pixel error, mask IoU, attributes read."""
    images = world.render_many(pics)                                                      # uint8 [N, 64, 64, 3]
    x = to_unit(torch.from_numpy(images).permute(0, 3, 1, 2))                               # [N, 3, 64, 64]
    x0 = encode_pictures(models.vae, x, dtype=torch.float32)                                # [N, 4, 16, 16]
    rec = to_uint8(decode_latents(models.vae, x0, dtype=torch.float32)).permute(0, 2, 3, 1).cpu().numpy()
    err = np.abs(rec.astype(np.float64) - images).mean(axis=(1, 2, 3))                      # [N]
    ious, read = [], []
    for p, a, b in zip(pics, images, rec):
        bg = world.render_background(p)
        m0, m1 = pixels.shape_mask(a, bg), pixels.shape_mask(b, bg)
        ious.append(pixels.iou(m0, m1))
        read.append(pixels.shape_colour(b, m1) == p.colour and pixels.shape_class(m1)[0] == p.shape)
    return {"pixel_error_mean": float(err.mean()), "pixel_error_worst": float(err.max()),
            "mask_iou_mean": float(np.mean(ious)), "mask_iou_min": float(np.min(ious)), "read": int(sum(read)),
            "pictures": len(pics), "latent_mean": float(x0.mean()), "latent_std": float(x0.std())}


def sample_figures(models, pics: list[world.Picture], guidance: float, seed: int) -> dict:
    """Samples for the pictures' captions: colour and shape read against the border's background."""
    imgs = to_uint8(sample(models.unet, models.vae, models.text_encoder, models.tokenizer, [p.caption for p in pics],
                           guidance, seed)).permute(0, 2, 3, 1).cpu().numpy()               # uint8 [N, 64, 64, 3]
    colour = shape = 0
    for p, img in zip(pics, imgs):
        m = pixels.shape_mask(img, pixels.estimate_background(img))
        colour += pixels.shape_colour(img, m) == p.colour
        shape += pixels.shape_class(m)[0] == p.shape
    return {"samples": len(pics), "colour": int(colour), "shape": int(shape), "guidance": guidance}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    models = load(args.model, device=args.device)
    with torch.inference_mode():
        print("VAE, 200 held-out pictures:", vae_figures(models, world.heldout_pictures(200)))
        print("samples (DDPM, 100 steps, guidance 5, seed 0):",
              sample_figures(models, world.heldout_pictures(args.samples), 5.0, 0))
    edits = EditSet(models, world.heldout_pictures(20))
    err = (regenerate(edits.f, edits.code("edit-friendly"), edits.source, edits.uncond) - edits.x0).abs().max()
    print(f"edit-friendly inversion (w_src 3.5, seed 0) + regeneration, 20 held-out pictures: max abs latent error "
          f"{float(err):.2e}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
