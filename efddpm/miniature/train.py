"""Train the embedded default model: a small SD1.x-architecture text-to-image model on the pictures of
efddpm.miniature.world. Also the worked example of training with efddpm's own modules (UNet, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, the SD1.x schedule), in the order Stable Diffusion was trained:

    1. data     N training pictures of efddpm.miniature.world (seeded; every one with its own look: colour within its
                word's range, shading, background texture), uint8 [N, 64, 64, 3]; their captions
                tokenized once by the real CLIP tokenizer ([C, 77] ids, one row per distinct caption)
    2. VAE      the KL autoencoder (SD1.x layout at width 32/64/64, factor 4: latents [4, 16, 16]),
                L1 reconstruction of a posterior sample plus a small KL term; then scaling_factor =
                1 / std of the latent modes over the data, so the UNet sees unit-variance latents
    3. latents  every picture encoded once: x_0 = mode * scaling_factor, [N, 4, 16, 16]
    4. UNet     epsilon prediction under the SD1.x schedule (1000 steps, scaled linear; eq. 2 noising),
                cross-attending to a small CLIP text encoder (SD1.x's 49408-token vocabulary and 77
                positions, 64 wide) trained jointly from scratch; each caption replaced by "" with
                probability P_UNCOND, for classifier-free guidance; an EMA of the weights
    5. save     the EMA weights in float16 in the official single-file layout (efddpm.save_single_file;
                efddpm.load reads it like SD1.5's file), the loss curves (.losses.json, .losses.png) and
                samples (.samples.png) next to it

AdamW, linear warm-up then cosine decay, gradients clipped at norm 1; bf16 autocast and a compiled UNet on
CUDA, float32 on CPU. --seed fixes the data, the initial weights and every batch. The step counts are set
from --minutes by timing a few passes of each stage and printed; --vae-steps / --unet-steps repeat a run
step for step (bit-exactness on CUDA also needs the same GPU and library versions).

    python -m efddpm.miniature.train --out weights/efddpm-shapes.safetensors --device cuda       # ~9 min on one H100
    python -m efddpm.miniature.train --out /tmp/tiny.safetensors --minutes 0.5 --pictures 2000 --batch 16   # CPU smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from efddpm.app.images import grid, to_uint8, to_unit
from efddpm.app.networks import decode_latents, encode_prompts
from efddpm.checkpoint import load, save_single_file
from efddpm.method import sampling
from efddpm.method.scheduler import SD1, alphas_cumprod
from efddpm.miniature import world
from efddpm.eval.charts import line_chart
from efddpm.nets.clip import CLIPTextConfig, CLIPTextModel
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.nets.vae import AutoencoderKL, VAEConfig

VAE_CONFIG = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2)  # scaling_factor set in stage 2
UNET_CONFIG = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                         num_heads=4, context_dim=64)
TEXT_CONFIG = CLIPTextConfig(width=64, layers=3, heads=4, mlp_width=256)

VAE_SHARE = 0.4        # of --minutes, when the VAE is trained here
VAE_BATCH = 128
VAE_LR = 1e-3
KL_WEIGHT = 1e-5       # per latent element, against the per-pixel L1
UNET_LR = 8e-4
P_UNCOND = 0.1         # classifier-free guidance dropout
EMA_DECAY = 0.999
SAMPLE_GUIDANCE = 5.0


# ---------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------

def make_data(n: int, seed: int, tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n training pictures -> (images uint8 [n, 3, 64, 64], caption index int64 [n], caption ids [C, 77])."""
    specs = world.pictures(n, seed, "train")
    chunks = [specs[i:i + 2000] for i in range(0, n, 2000)]
    with Pool(min(len(chunks), os.cpu_count() or 1)) as pool:
        images = np.concatenate(pool.map(world.render_many, chunks))             # [n, 64, 64, 3]
    captions = sorted({p.caption for p in specs})
    index = {c: i for i, c in enumerate(captions)}
    which = torch.tensor([index[p.caption] for p in specs])                         # [n]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), which, tokenizer(captions)


# ---------------------------------------------------------------------------------------------
# The training loop shared by both stages
# ---------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of parameters; decay warms up as (1 + n) / (10 + n)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_in(seconds: float, loss_fn: Callable[[torch.Generator], torch.Tensor], params, device) -> int:
    """How many training steps fit in `seconds`: times forward + backward passes on batches from a
    throwaway generator (3 warm-up, then 5 timed; +10% for the optimizer); no weight changes."""
    gen = torch.Generator(device).manual_seed(12345)
    for i in range(8):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        loss_fn(gen).backward()
    _sync(device)
    for p in params:
        p.grad = None
    return max(1, int(seconds / ((time.perf_counter() - t0) / 5 * 1.1)))


def fit(name: str, loss_fn: Callable[[torch.Generator], torch.Tensor], params: list, steps: int, lr: float,
        seed: int, device: torch.device, ema: EMA | None = None) -> list[tuple[int, float]]:
    """AdamW for `steps` steps of loss_fn(generator); returns the loss curve [(step, mean loss)]."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    warmup = max(1, min(500, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator(device).manual_seed(seed)
    every = max(1, steps // 400)          # points on the curve
    curve, total, t0 = [], torch.zeros((), device=device), time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        total += loss.detach()
        if step % every == 0 or step == steps:
            curve.append((step, float(total) / (step - (curve[-1][0] if curve else 0))))
            total.zero_()
            if len(curve) % 20 == 0 or step == steps:
                print(f"{name} step {step}/{steps}  loss {curve[-1][1]:.5f}  {time.perf_counter() - t0:.0f} s",
                      flush=True)
    return curve


def autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------
# 2. VAE, 3. latents
# ---------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, seconds: float, steps: int | None, seed: int, device: torch.device
              ) -> tuple[AutoencoderKL, list, int]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAE_CONFIG).to(device).train()
    params = list(vae.parameters())

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        x = to_unit(images[torch.randint(len(images), (VAE_BATCH,), generator=gen, device=device)])  # [B, 3, 64, 64]
        with autocast(device):
            post = vae.encode(x)
            rec = vae.decode(post.sample(gen))
        kl = 0.5 * (post.mean.float() ** 2 + post.std.float() ** 2 - 1 - post.logvar.float())  # KL(q || N(0, I))
        return (rec.float() - x).abs().mean() + KL_WEIGHT * kl.mean()

    steps = steps or steps_in(seconds, loss_fn, params, device)
    print(f"VAE: {sum(p.numel() for p in params):,} parameters, {steps} steps of batch {VAE_BATCH}", flush=True)
    curve = fit("vae", loss_fn, params, steps, VAE_LR, seed + 1, device)
    return vae.eval(), curve, steps


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Posterior modes (unscaled), float32 [N, 4, 16, 16]."""
    return torch.cat([vae.encode(to_unit(images[i:i + batch])).mode().float() for i in range(0, len(images), batch)])


# ---------------------------------------------------------------------------------------------
# 4. UNet and text encoder
# ---------------------------------------------------------------------------------------------

def train_unet(latents: torch.Tensor, which: torch.Tensor, caption_ids: torch.Tensor, uncond_ids: torch.Tensor,
               batch: int, seconds: float, steps: int | None, seed: int, device: torch.device
               ) -> tuple[UNet, CLIPTextModel, list, int]:
    torch.manual_seed(seed)
    unet, text = UNet(UNET_CONFIG).to(device).train(), CLIPTextModel(TEXT_CONFIG).to(device).train()
    net = torch.compile(unet) if device.type == "cuda" else unet
    params = list(unet.parameters()) + list(text.parameters())
    abar = alphas_cumprod(SD1).to(device)                                          # [1000]

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(latents), (batch,), generator=gen, device=device)
        x0 = latents[idx]                                                           # [B, 4, 16, 16]
        t = torch.randint(0, SD1.num_train_timesteps, (batch,), generator=gen, device=device)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                                  # eq. 2
        drop = torch.rand(batch, generator=gen, device=device) < P_UNCOND
        ids = torch.where(drop[:, None], uncond_ids, caption_ids[which[idx]])       # [B, 77]
        with autocast(device):
            pred = net(x_t, t, text(ids))
        return F.mse_loss(pred.float(), eps)

    steps = steps or steps_in(seconds, loss_fn, params, device)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters, text encoder "
          f"{sum(p.numel() for p in text.parameters()):,}; {steps} steps of batch {batch}", flush=True)
    ema = EMA(params, EMA_DECAY)
    curve = fit("unet", loss_fn, params, steps, UNET_LR, seed + 1, device, ema)
    ema.copy_to_params()
    return unet.eval(), text.eval(), curve, steps


# ---------------------------------------------------------------------------------------------
# 5. Samples and curves
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(unet: UNet, vae: AutoencoderKL, text: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str],
           guidance: float, seed: int, num_steps: int = 100) -> torch.Tensor:
    """DDPM sampling from x_T (efddpm.method.sampling: eq. 3 with fresh z_t, eta = 1; the UNet is the noise predictor
    f(x_t, t, context)), x_T and then every z_t drawn from one generator seeded by `seed` -> images [B, 3, 64, 64]
    in [-1, 1]."""
    device = next(unet.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    cond, uncond = encode_prompts(tokenizer, text, prompts), encode_prompts(tokenizer, text, [""])  # [B | 1, 77, 64]
    size = world.DEFAULT_SIZE // 2 ** (len(vae.config.channel_mult) - 1)
    x = torch.randn(len(prompts), 4, size, size, generator=gen, device=device)     # x_T, [B, 4, 16, 16]
    x0 = sampling.sample(unet, x, cond, uncond, guidance, start=num_steps, num_steps=num_steps, generator=gen)
    return decode_latents(vae, x0, dtype=torch.float32)                              # [B, 3, 64, 64]


def picture_grid(images: torch.Tensor, columns: int, scale: int = 2) -> Image.Image:
    """[B, 3, H, W] in [-1, 1] -> one image, `columns` wide, each picture enlarged `scale` x (nearest)."""
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()                        # [B, H, W, 3]
    b, h, w, _ = arr.shape
    rows = math.ceil(b / columns)
    out = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, a in enumerate(arr):
        out.paste(Image.fromarray(a), ((i % columns) * w, (i // columns) * h))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)


def curves_png(curves: dict[str, list], path: Path) -> None:
    grid([line_chart({name: c}, f"{name} training loss", "step", "loss", log_y=True)
          for name, c in curves.items() if c]).save(path)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m efddpm.miniature.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the model file to write (.safetensors)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=7.0, help="time for the training steps of both stages")
    ap.add_argument("--pictures", type=int, default=300_000, help="training pictures drawn")
    ap.add_argument("--batch", type=int, default=512, help="UNet batch (the VAE's is %d)" % VAE_BATCH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae", type=Path, help="take the VAE of this model file instead of training one")
    ap.add_argument("--vae-steps", type=int, help="VAE steps (default: what fits in its share of --minutes)")
    ap.add_argument("--unet-steps", type=int, help="UNet steps (default: what fits in the rest of --minutes)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    seconds = args.minutes * 60
    tokenizer = CLIPTokenizer.bundled()

    images, which, caption_ids = make_data(args.pictures, args.seed, tokenizer)
    print(f"data: {len(images)} pictures, {len(caption_ids)} captions, {time.perf_counter() - started:.0f} s", flush=True)
    images, which, caption_ids = images.to(device), which.to(device), caption_ids.to(device)

    curves, steps = {}, {}
    if args.vae is None:
        vae, curves["vae"], steps["vae"] = train_vae(images, VAE_SHARE * seconds, args.vae_steps, args.seed, device)
        seconds *= 1 - VAE_SHARE
    else:
        vae = load(args.vae, device=device).vae
    modes = encode_all(vae, images)                                                 # [N, 4, 16, 16]
    if args.vae is None:   # unit-variance latents; SD1.x's 0.18215 was found the same way
        vae.config = replace(vae.config, scaling_factor=float(f"{1.0 / float(modes.std()):.5g}"))
    latents = modes * vae.config.scaling_factor
    print(f"latents: {tuple(latents.shape)}, scaling_factor {vae.config.scaling_factor}, "
          f"mean {float(latents.mean()):.3f} std {float(latents.std()):.3f}", flush=True)
    del images, modes

    uncond_ids = tokenizer([""]).to(device)
    unet, text, curves["unet"], steps["unet"] = train_unet(latents, which, caption_ids, uncond_ids, args.batch,
                                                           seconds, args.unet_steps, args.seed + 2, device)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(args.out, copy.deepcopy(unet).half(), copy.deepcopy(vae).half(), copy.deepcopy(text).half(),
                     image_size=world.DEFAULT_SIZE, defaults=world.MODEL_DEFAULTS)
    stem = args.out.with_suffix("")
    prompts = [p.caption for p in world.heldout_pictures(16)]
    picture_grid(sample(unet, vae, text, tokenizer, prompts, SAMPLE_GUIDANCE, args.seed), 8).save(f"{stem}.samples.png")
    curves_png(curves, Path(f"{stem}.losses.png"))
    record = {"command": "python -m efddpm.miniature.train " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": steps, "seconds": round(time.perf_counter() - started, 1), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "pictures": args.pictures, "batch": args.batch, "seed": args.seed,
              "configs": {"unet": asdict(unet.config), "vae": asdict(vae.config), "text_encoder": asdict(text.config)},
              "sample_prompts": prompts, "curves": curves}
    Path(f"{stem}.losses.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2 ** 20:.1f} MiB), {stem}.losses.json/.png, "
          f"{stem}.samples.png; {record['seconds']:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
