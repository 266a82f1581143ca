"""The reference edit on one GPU: efddpm against a diffusers implementation of the same loop, in ONE process.

The job (the paper's reference edit): one 512x512 image, SD1.x-sized networks with random weights (time does not
depend on weight values), 100 DDPM steps, eta 1, guidance 3.5 / 15, skip 36; VAE encode + inversion + regeneration +
VAE decode. Prints seconds per warm edit, ratios against the diffusers rows measured in the same run, peak GPU
memory, compile warm-up, efddpm's fp16-vs-fp32 deviation and its fp32 reconstruction error, and the cold start
of the `efddpm edit` command (process start to PNG, weights on disk).

    python benchmarks/speed.py                  # everything but the compiled variants (~5 min on an H100)
    python benchmarks/speed.py --compiled       # torch.compile rows: diffusers eager then compiled, and efddpm (plain
                                                # and Prompt-to-Prompt, compiled then eager) in two fresh processes
                                                # sharing a fresh compile cache (the second reads it)
    python benchmarks/speed.py --p2p            # efddpm only: the edit with Prompt-to-Prompt beside the plain edit

Needs a CUDA GPU; diffusers and transformers only for the baseline rows (benchmark-only dependencies).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from efddpm import AutoencoderKL, CLIPTextModel, CLIPTokenizer, Editor, StableDiffusionModels, UNet  # noqa: E402
from efddpm.method.p2p import P2P  # noqa: E402
from efddpm.method.scheduler import diffusers_config  # noqa: E402

DEV, STEPS, SKIP, W_SRC, W_TGT = "cuda", 100, 36, 3.5, 15.0
SOURCE, TARGET = "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` warm calls (the caller has warmed up)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# ------------------------------------------------------------------------------------------ efddpm

def efddpm_models(dtype: torch.dtype) -> StableDiffusionModels:
    torch.manual_seed(0)
    with torch.device(DEV):
        unet, vae, text = UNet(), AutoencoderKL(), CLIPTextModel()
    models = [m.to(dtype).eval().requires_grad_(False) for m in (unet, vae, text)]
    return StableDiffusionModels(*models, CLIPTokenizer.bundled(), None, None, "random SD1.x")


def efddpm_edit(editor: Editor, image: Image.Image, seed: int = 0, p2p: P2P | None = None,
                overlap: bool = True) -> torch.Tensor:
    """The reference edit: Editor.invert_and_edit (on the fast path the inversion overlaps the regeneration), or
    (overlap False) Editor.invert then Editor.edit, one after the other."""
    if overlap:
        return editor.invert_and_edit(image, SOURCE, TARGET, steps=STEPS, source_guidance=W_SRC, guidance=W_TGT,
                                      skip=SKIP, seed=seed, output="tensor", p2p=p2p)[0]
    code = editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=seed, skip=SKIP)
    return editor.edit(code, TARGET, guidance=W_TGT, skip=SKIP, output="tensor", p2p=p2p)


def efddpm_latents(editor: Editor, image: Image.Image, seed: int = 0) -> torch.Tensor:
    code = editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=seed, skip=SKIP)
    return editor.regenerate(code, TARGET, guidance=W_TGT, skip=SKIP)


# ------------------------------------------------------------------------------------------ diffusers

def diffusers_setup():
    """diffusers' UNet/VAE and transformers' CLIP at SD1.x size, fp16, and the reference edit written the way a
    careful diffusers user does: guidance batched, SDPA, edit-friendly inversion then regeneration."""
    from diffusers import AutoencoderKL as DVAE, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel as HFText
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(DEV, torch.float16)
    vae = DVAE(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).to(DEV, torch.float16)
    text = HFText(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
                  ).to(DEV, torch.float16)
    sched = DDIMScheduler(**diffusers_config())
    sched.set_timesteps(STEPS)
    tok = CLIPTokenizer.bundled()

    def edit(u, image, skip_unused: bool = False):
        ts, ac = sched.timesteps, sched.alphas_cumprod.to(DEV)
        with torch.inference_mode():
            ids = tok(["", SOURCE, TARGET]).to(DEV)
            emb = text(ids)[0]
            c_src, c_tgt = emb[[0, 1]], emb[[0, 2]]
            x0 = vae.encode(image).latent_dist.mode() * 0.18215
            xs = [x0] + [ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * torch.randn_like(x0) for t in reversed(ts)]

            def mu(x, t, c, w):  # eq. 4, eta = 1
                e_u, e_c = u(torch.cat([x, x]), t, encoder_hidden_states=c).sample.chunk(2)
                eps = e_u + w * (e_c - e_u)
                a = ac[t]
                ap = ac[t - 10] if t >= 10 else ac[0]
                var = (1 - ap) / (1 - a) * (1 - a / ap)
                return ap.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - ap - var).sqrt() * eps, var.sqrt()

            zs = [None] * STEPS
            first = SKIP if skip_unused else 0  # the shared baseline inverts all steps; skip_unused: as ours
            for i, t in enumerate(ts[first:], start=first):
                m, sd = mu(xs[STEPS - i], t, c_src, W_SRC)
                zs[STEPS - i - 1] = (xs[STEPS - i - 1] - m) / sd
            x = xs[STEPS - SKIP]
            for i, t in enumerate(ts[SKIP:]):
                m, sd = mu(x, t, c_tgt, W_TGT)
                x = m + sd * zs[STEPS - SKIP - i - 1]
            return vae.decode(x / 0.18215).sample

    return unet, edit


# ------------------------------------------------------------------------------------------ runs

def pixels(image: Image.Image) -> torch.Tensor:
    """The input of the diffusers edit: [1, 3, H, W] float16 in [-1, 1] on the GPU."""
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].to(DEV, torch.float16) / 127.5 - 1


def eager_rows(res: dict, image: Image.Image) -> None:
    image_tensor = pixels(image)
    d_unet, d_edit = diffusers_setup()
    d_edit(d_unet, image_tensor)
    res["diffusers_fp16_eager_s"] = timed(lambda: d_edit(d_unet, image_tensor))
    res["diffusers_fp16_eager_peak_GiB"] = peak_gib(lambda: d_edit(d_unet, image_tensor))
    res["diffusers_fp16_eager_skip_unused_s"] = timed(lambda: d_edit(d_unet, image_tensor, skip_unused=True))
    del d_unet, d_edit
    torch.cuda.empty_cache()

    models = efddpm_models(torch.float16)
    for name, fast, channels_last, overlap in (
            ("efddpm_fp16_plain", False, False, False), ("efddpm_fp16_fast_sequential", True, True, False),
            ("efddpm_fp16_fast", True, True, True)):  # the last: what from_pretrained and the command give
        models.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        editor = Editor(models, torch.float16, fast=fast)
        job = lambda: efddpm_edit(editor, image, overlap=overlap)
        start = time.perf_counter()
        job()  # warm-up: CUDA graph capture, cuDNN kernel selection
        torch.cuda.synchronize()
        res[f"{name}_warmup_s"] = time.perf_counter() - start
        res[f"{name}_s"] = timed(job, 5)
        res[f"{name}_peak_GiB"] = peak_gib(job)
        if name == "efddpm_fp16_fast":
            phase_rows(res, editor, image)
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)
        del editor
        gc.collect()
        torch.cuda.empty_cache()
    # fp16 vs fp32 (same weights, same seed), and the fp32 fast path's exact reconstruction
    fast16 = Editor(models, torch.float16, fast=True)
    lat16 = efddpm_latents(fast16, image)
    models32 = StableDiffusionModels(models.unet.float(), models.vae.float(), models.text_encoder.float(),
                                     models.tokenizer, None, None, models.source)
    fast32 = Editor(models32, torch.float32, fast=True)
    lat32 = efddpm_latents(fast32, image)
    diff = (lat16 - lat32).abs()
    res["fp16_vs_fp32_latent_max_abs"], res["fp16_vs_fp32_latent_mean_abs"] = diff.max().item(), diff.mean().item()
    res["latent_mean_abs"] = lat32.abs().mean().item()
    code = fast32.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=0)
    recon = fast32.regenerate(code, SOURCE, guidance=None, skip=0)
    res["fp32_fast_reconstruction_max_abs"] = (recon - code.xts[0]).abs().max().item()
    res["efddpm_fp32_fast_s"] = timed(lambda: efddpm_edit(fast32, image), repeats=1)

    # UNet latency and peak memory by batch (calibrates efddpm.app.fast.inversion_chunk's memory estimate)
    unet16 = models.unet.half()
    lat, mem = {}, {}
    with torch.inference_mode():
        c = torch.randn(1, 77, 768, device=DEV, dtype=torch.float16)
        for b in (2, 16, 32, 64):
            x = torch.randn(b, 4, 64, 64, device=DEV, dtype=torch.float16)
            t = torch.full((b,), 500, device=DEV)
            f = lambda: unet16(x, t, c.expand(b, -1, -1))
            f()
            lat[b] = round(timed(f, 10) * 1e3, 2)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            f()
            mem[b] = round((torch.cuda.max_memory_allocated() - base) / 2**20 / b, 1)
    res["efddpm_unet_fp16_eager_ms_by_batch"], res["efddpm_unet_fp16_activation_MiB_per_sample"] = lat, mem

    # cold start: `efddpm edit` from process start to PNG, weights on disk (benchmarks/cold_start.py: phases too)
    from cold_start import command_seconds, phases, write_checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoints = write_checkpoints(folder)
        for path in folder.rglob("*.safetensors"):
            path.read_bytes()                                       # into the page cache
        for name, model in checkpoints.items():
            res[f"cold_start_{name}_s"] = [command_seconds(model, folder, ROOT) for _ in range(2)]
            res[f"cold_start_{name}_phases_s"] = phases(model, folder, ROOT)


def phase_rows(res: dict, editor: Editor, image: Image.Image) -> None:
    """Where a warm edit's time goes, each phase alone (synchronised): VAE encode, the batched inversion, the
    graph-replayed regeneration, VAE decode; and the UNet's work against the GPU's bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode
    x0, _ = editor.encode_image(image)
    code = editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=0, skip=SKIP)
    latents = editor.regenerate(code, TARGET, guidance=W_TGT, skip=SKIP)
    res["phase_encode_s"] = timed(lambda: editor.encode_image(image), 5)
    res["phase_inversion_s"] = timed(lambda: editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=0,
                                                           skip=SKIP), 5)
    res["phase_regeneration_s"] = timed(lambda: editor.regenerate(code, TARGET, guidance=W_TGT, skip=SKIP), 5)
    res["phase_decode_s"] = timed(lambda: editor.decode(latents), 5)
    unet = editor.models.unet
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x0.half().to(memory_format=torch.channels_last), torch.tensor([500], device=DEV),
             torch.zeros(1, 77, 768, device=DEV, dtype=torch.float16))
    samples = 2 * 2 * (STEPS - SKIP)                                   # inversion + regeneration, guided
    res["unet_tflop_per_edit"] = counter.get_total_flops() * samples / 1e12
    res["unet_tflop_per_s_in_the_edit"] = res["unet_tflop_per_edit"] / res["efddpm_fp16_fast_s"]
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("phase", "unet_tflop"))}), flush=True)


def compiled_rows(res: dict, image: Image.Image) -> None:
    image_tensor = pixels(image)
    d_unet, d_edit = diffusers_setup()
    d_edit(d_unet, image_tensor)                                        # the eager baseline of the same run
    res["diffusers_fp16_eager_s"] = timed(lambda: d_edit(d_unet, image_tensor))
    d_unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(d_unet, fullgraph=True)
    start = time.perf_counter()
    d_edit(compiled, image_tensor)
    torch.cuda.synchronize()
    res["diffusers_fp16_compiled_warmup_s"] = time.perf_counter() - start
    res["diffusers_fp16_compiled_s"] = timed(lambda: d_edit(compiled, image_tensor))
    print(json.dumps(res), flush=True)
    del d_unet, d_edit, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()

    # efddpm compiled, in two fresh processes sharing a fresh cache: the first compiles, the second reads the cache
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for run in ("first", "second"):
            proc = subprocess.run([sys.executable, __file__, "--compiled-child"], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=420)
            if proc.returncode:
                sys.exit(f"the compiled child failed: {proc.stderr[-3000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            child["recompile_limit_warnings"] = proc.stderr.count("hit config.recompile_limit")
            res.update({f"efddpm_fp16_fast_compiled_{k}_{run}_process": v for k, v in child.items()})
            print(json.dumps(child), flush=True)
    res["efddpm_fp16_fast_compiled_s"] = res["efddpm_fp16_fast_compiled_s_second_process"]
    res["efddpm_fp16_fast_s"] = res["efddpm_fp16_fast_compiled_eager_s_second_process"]
    res["efddpm_fp16_fast_compiled_p2p_s"] = res["efddpm_fp16_fast_compiled_p2p_s_second_process"]
    res["efddpm_fp16_fast_p2p_s"] = res["efddpm_fp16_fast_compiled_eager_p2p_s_second_process"]


def compiled_child() -> None:
    """One process of the compiled rows: Editor.compile() (efddpm.app.fast.compiled: PyTorch's persistent caches
    in TORCHINDUCTOR_CACHE_DIR), the warm-up edit (compiling or reading the cache, and capturing the graphs), warm
    edits, peak memory, each phase alone, the Prompt-to-Prompt edit (its regeneration runs the uncompiled UNet:
    efddpm.app.fast.GraphedUNet); then the same weights eager in this process (the baseline of the same run)."""
    gen = np.random.default_rng(0)
    image = Image.fromarray(gen.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    models = efddpm_models(torch.float16)
    models.unet.to(memory_format=torch.channels_last)
    res = {}
    editor = Editor(models, torch.float16, fast=True).compile()
    start = time.perf_counter()
    efddpm_edit(editor, image)
    torch.cuda.synchronize()
    res["warmup_s"] = time.perf_counter() - start
    res["s"] = timed(lambda: efddpm_edit(editor, image), 5)
    res["sequential_s"] = timed(lambda: efddpm_edit(editor, image, overlap=False), 5)
    res["peak_GiB"] = peak_gib(lambda: efddpm_edit(editor, image))
    code = editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=0, skip=SKIP)   # each phase alone
    res["phase_inversion_s"] = timed(lambda: editor.invert(image, SOURCE, steps=STEPS, guidance=W_SRC, seed=0,
                                                           skip=SKIP), 5)
    res["phase_regeneration_s"] = timed(lambda: editor.regenerate(code, TARGET, guidance=W_TGT, skip=SKIP), 5)
    start = time.perf_counter()                                         # Prompt-to-Prompt (its inversion compiled)
    efddpm_edit(editor, image, p2p=P2P())
    torch.cuda.synchronize()
    res["p2p_warmup_s"] = time.perf_counter() - start
    res["p2p_s"] = timed(lambda: efddpm_edit(editor, image, p2p=P2P()), 3)
    models.unet = models.unet._orig_mod  # the same weights, eager
    editor = Editor(models, torch.float16, fast=True)
    efddpm_edit(editor, image)
    res["eager_s"] = timed(lambda: efddpm_edit(editor, image), 5)
    efddpm_edit(editor, image, p2p=P2P())
    res["eager_p2p_s"] = timed(lambda: efddpm_edit(editor, image, p2p=P2P()), 3)
    print(json.dumps(res))


def p2p_rows(res: dict, image: Image.Image) -> None:
    """The reference edit with Prompt-to-Prompt (the authors' xa 0.6, sa 0.2; a word swap, so AttentionReplace)
    beside the plain edit, same weights, same run. While a controller is attached the UNet runs eagerly (no CUDA
    graph) and computes explicit attention probabilities where the controller asks (cross-attention everywhere, self-
    attention at <= 256 keys), and the source row runs beside the target row: batch 4 instead of 2."""
    models = efddpm_models(torch.float16)
    models.unet.to(memory_format=torch.channels_last)
    for name, fast, p2p in (("efddpm_fp16_fast", True, None), ("efddpm_fp16_fast_p2p", True, P2P()),
                            ("efddpm_fp16_plain", False, None), ("efddpm_fp16_plain_p2p", False, P2P())):
        editor = Editor(models, torch.float16, fast=fast)
        efddpm_edit(editor, image, p2p=p2p)  # warm-up
        res[f"{name}_s"] = timed(lambda: efddpm_edit(editor, image, p2p=p2p))
        res[f"{name}_peak_GiB"] = peak_gib(lambda: efddpm_edit(editor, image, p2p=p2p))
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)
        del editor
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true", help="the torch.compile rows, with diffusers eager as their baseline")
    parser.add_argument("--p2p", action="store_true", help="only the Prompt-to-Prompt rows (efddpm alone)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compiled-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compiled_child:
        return compiled_child()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/speed.py needs a CUDA GPU")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    gen = np.random.default_rng(0)
    image = Image.fromarray(gen.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    (compiled_rows if args.compiled else p2p_rows if args.p2p else eager_rows)(res, image)
    for ours, theirs in (("efddpm_fp16_fast_s", "diffusers_fp16_eager_s"),
                         ("efddpm_fp16_fast_s", "diffusers_fp16_eager_skip_unused_s"),
                         ("efddpm_fp16_fast_sequential_s", "diffusers_fp16_eager_s"),
                         ("efddpm_fp16_plain_s", "diffusers_fp16_eager_s"),
                         ("efddpm_fp16_fast_compiled_s", "diffusers_fp16_compiled_s"),
                         ("efddpm_fp16_fast_compiled_s", "diffusers_fp16_eager_s"),
                         ("efddpm_fp16_fast_compiled_s", "efddpm_fp16_fast_compiled_p2p_s"),
                         ("efddpm_fp16_fast_s", "diffusers_fp16_compiled_s"),
                         ("efddpm_fp16_fast_s", "efddpm_fp16_fast_p2p_s"), ("efddpm_fp16_plain_s", "efddpm_fp16_plain_p2p_s")):
        if ours in res and theirs in res:
            res[f"speedup_{ours[:-2]}_vs_{theirs[:-2]}"] = res[theirs] / res[ours]
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
