"""The main job as a Python API: invert a real image under a source prompt, then edit it with target prompts.

    editor = Editor.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    code = editor.invert("cat.png", "a photo of a cat", seed=0)       # LatentCode: x_T, z_T..z_1, trajectory, settings
    dog, = editor.edit(code, "a photo of a dog")                      # PIL images, one per target prompt
    code.save("cat.safetensors")                                      # LatentCode.load(...) to edit again later

Images become x_0 = mode of the VAE posterior times the scaling factor (SPEC pitfall 6); prompts become CLIP's
last hidden state. The UNet runs in the editor's dtype; the method keeps x_t and the noise maps in at least
float32 and divides by sigma_t there (pitfall 4). An empty source prompt means no guidance term during the
inversion, as in the authors' code (pitfall 5); otherwise eps = f("") + w (f(prompt) - f("")).
"""
import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .checkpoint import CheckpointError, StableDiffusionModels, load
from .fast import GraphedUNet, inversion_chunk
from .images import load_image, to_pil
from .inversion import LatentCode, edit_friendly_inversion, regenerate
from .manipulations import colour_edit, colour_target, latent_mask, shift_code
from .scheduler import SD1, check_alphas_cumprod
from .shapes import DEFAULT_MODEL, DEFAULT_TARGET_GUIDANCE

PAPER_TARGET_GUIDANCE = 15.0   # the paper's target guidance for SD1.x

Progress = Callable[[int], None]  # called with the number of network calls just made


def check_schedule(models: StableDiffusionModels) -> None:
    """Refuse a checkpoint whose training noise schedule is not SD1.x's (the method's grid assumes it)."""
    if models.alphas_cumprod is not None:
        try:
            check_alphas_cumprod(models.alphas_cumprod, SD1)
        except ValueError as e:
            raise CheckpointError(f"{models.source}: {e}") from None
    cfg = models.scheduler_config or {}
    expected = {"num_train_timesteps": SD1.num_train_timesteps, "beta_start": SD1.beta_start,
                "beta_end": SD1.beta_end, "beta_schedule": SD1.kind}
    different = {k: cfg[k] for k, v in expected.items() if k in cfg and cfg[k] != v}
    if different:
        raise CheckpointError(f"{models.source}: scheduler_config.json has {different}, SD1.x's schedule is {expected}")


@contextlib.contextmanager
def exact_float32(dtype: torch.dtype):
    """For float32 networks on CUDA, keep convolutions and matmuls in true float32 (no TF32, whose 10-bit
    mantissa would break the exact reconstruction); other dtypes are left alone."""
    if dtype != torch.float32 or not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class Editor:
    """The models of one checkpoint, and the edit-friendly inversion and editing of images with them.

    fast (from_pretrained: on for CUDA): half-precision inversions batched over timesteps, the regeneration
    replayed from CUDA graphs, the UNet in channels_last (efddpm.fast). Same formulas."""
    models: StableDiffusionModels
    dtype: torch.dtype
    fast: bool = False
    graphed_unet: GraphedUNet | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_pretrained(cls, source: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        revision: str | None = None, offline: bool | None = None) -> "Editor":
        """A hub id, a diffusers folder or a single-file checkpoint (see efddpm.checkpoint.load)."""
        models = load(source, device=device, dtype=dtype, revision=revision, offline=offline)
        check_schedule(models)
        fast = torch.device(device).type == "cuda"
        if fast:
            models.unet.to(memory_format=torch.channels_last)
        return cls(models, dtype, fast=fast)

    @property
    def device(self) -> torch.device:
        return next(self.models.unet.parameters()).device

    @property
    def target_guidance(self) -> float:
        """The default target guidance: the paper's 15, or 7.5 for the embedded shapes model (at 15 its edits
        over-saturate: benchmarks/edit_benchmark.py)."""
        path = Path(self.models.source)
        embedded = path.is_file() and path.resolve() == DEFAULT_MODEL.resolve()
        return DEFAULT_TARGET_GUIDANCE if embedded else PAPER_TARGET_GUIDANCE

    # ------------------------------------------------------------------ the networks, as the method needs them

    def count_tokens(self, prompt: str) -> int:
        return self.models.tokenizer.count_tokens(prompt)

    def prompt_warnings(self, prompts: list[str]) -> list[str]:
        """One line for each prompt that the text encoder cuts after 75 tokens."""
        limit = self.models.tokenizer.model_max_length - 2
        return [f"prompt has {n} tokens, only the first {limit} are used: {p!r}"
                for p in prompts if (n := self.count_tokens(p)) > limit]

    @torch.inference_mode()
    def encode_prompts(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden states [B, 77, width]; warns when a prompt is cut after 75 tokens."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for message in self.prompt_warnings(prompts):
            warnings.warn(message, stacklevel=3)
        return self.models.text_encoder(self.models.tokenizer(prompts).to(self.device))  # [B, 77, width]

    @torch.inference_mode()
    def encode_image(self, image, size: int | None = None) -> tuple[torch.Tensor, str]:
        """Image (path, PIL, uint8 numpy, [3, H, W] tensor in [0, 1]) -> x_0 [1, 4, size/f, size/f] in the method's
        dtype (float32, float64 for a float64 editor), and a line saying how the image was cropped and resized
        (efddpm.images)."""
        pixels, note = load_image(image, size or self.models.image_size)  # [1, 3, size, size] in [-1, 1]
        vae = self.models.vae
        x0 = vae.encode(pixels.to(self.device, self.dtype)).mode() * vae.config.scaling_factor  # pitfall 6
        return x0.to(torch.promote_types(self.dtype, torch.float32)), note   # pitfall 4: x_t never in half

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1] (float32)."""
        vae = self.models.vae
        return vae.decode((latents / vae.config.scaling_factor).to(self.dtype)).float().clamp(-1, 1)

    def noise_predictor(self, progress: Progress | None = None, graphed: bool = False):
        """f(x_t, t, text) for efddpm.inversion: the UNet in the editor's dtype (the method upcasts its output);
        graphed: replayed from CUDA graphs (the fast path's sequential regeneration)."""
        unet, dtype = self.models.unet, self.dtype
        if graphed and self.fast:
            self.graphed_unet = self.graphed_unet or GraphedUNet(unet)
            unet = self.graphed_unet

        @torch.inference_mode()
        def f(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            with exact_float32(dtype):
                eps = unet(x.to(dtype), t, context.to(dtype))
            if progress is not None:
                progress(1)
            return eps

        return f

    # ------------------------------------------------------------------ the job

    def invert(self, image, source_prompt: str = "", *, steps: int = 100, guidance: float = 3.5, eta: float = 1.0,
               seed: int | None = None, size: int | None = None, skip: int = 0,
               progress: Progress | None = None) -> LatentCode:
        """Edit-friendly inversion (Algorithm 1) of one image under the source prompt (`steps - skip` network
        calls). skip: the code serves edits with that skip or more (the noisier steps are left out)."""
        x0, note = self.encode_image(image, size)
        uncond = self.encode_prompts("")
        cond = self.encode_prompts(source_prompt) if source_prompt else None  # "": no guidance term
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        chunk = inversion_chunk(self.models.unet, x0, steps - skip, 2 if cond is not None else 1, self.dtype) \
            if self.fast else 1
        return edit_friendly_inversion(
            self.noise_predictor(progress, graphed=chunk == 1), x0, cond, uncond,
            guidance if cond is not None else None, num_steps=steps, eta=eta, generator=generator, skip=skip, chunk=chunk,
            meta={"source_prompt": source_prompt, "model": self.models.source, "image": note,
                  "model_dtype": str(self.dtype).removeprefix("torch.")})

    def regenerate(self, code: LatentCode, prompts: str | list[str], *, guidance: float | list[float] | None = 15.0,
                   skip: int = 36, eta: float | None = None, progress: Progress | None = None,
                   **options) -> torch.Tensor:
        """Eq. 3 replayed with the code's noise maps under each prompt, from T - skip -> x_0 latents [K, 4, h, w].
        guidance None: the code's source guidance (none for a code of an empty source prompt: then f(x, t, prompt)).
        options: those of efddpm.inversion.regenerate (zero_last_noise, reference_direction, noise_edit)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        f = self.noise_predictor(progress, graphed=True)
        return regenerate(f, code.to(self.device), self.encode_prompts(prompts), self.encode_prompts(""), guidance,
                          skip=skip, eta=eta, **options)  # [K, 4, h, w]

    def edit(self, code: LatentCode, target_prompts: str | list[str], *, guidance: float | list[float] | None = None,
             skip: int = 36, eta: float | None = None, output: str = "pil",
             progress: Progress | None = None) -> list[Image.Image] | torch.Tensor:
        """Edited images, one per target prompt: PIL images, or a tensor [K, 3, H, W] in [-1, 1] (output="tensor").
        guidance: one weight, or one per prompt; None: self.target_guidance."""
        guidance = self.target_guidance if guidance is None else guidance
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', not {output!r}")
        latents = self.regenerate(code, target_prompts, guidance=guidance, skip=skip, eta=eta, progress=progress)
        images = self.decode(latents)
        return images if output == "tensor" else to_pil(images)

    # ------------------------------------------------------------------ the paper's other manipulations

    def shift(self, code: LatentCode, dy: int, dx: int, prompt: str | None = None, *,
              progress: Progress | None = None) -> Image.Image:
        """Image shifting: every noise map (and x_T) moved by (dy, dx) latent pixels, regenerated from x_T
        under the source prompt (or `prompt`) and guidance: the output is the image shifted (see
        efddpm.manipulations.shift for the border)."""
        prompt = code.settings.get("source_prompt", "") if prompt is None else prompt
        latents = self.regenerate(shift_code(code, dy, dx), prompt, guidance=None, skip=0, progress=progress)
        return to_pil(self.decode(latents))[0]

    def recolor(self, code: LatentCode, image, mask, colour: tuple[float, float, float], *, strength: float = 0.2,
                step_range: tuple[int, int] = (1, 40), prompt: str | None = None, size: int | None = None,
                progress: Progress | None = None) -> Image.Image:
        """Colour manipulation: while regenerating, for t in step_range push z_t by s * B * (M - P(f_t(x_t))),
        B the mask on the latent grid, M the latent of the image with the masked region painted `colour`
        (RGB in [0, 1]). `mask`: anything efddpm.images.load_image takes, the size of `image`; white = edit."""
        size = size or self.models.image_size
        pixels, _ = load_image(image, size)                                       # [1, 3, size, size]
        mask_pixels, _ = load_image(mask, size)
        pixel_mask = (mask_pixels.mean(dim=1, keepdim=True) > 0).float()           # [1, 1, size, size]
        encode = lambda img: self.encode_image(img[0] * 0.5 + 0.5, size)[0]
        target = colour_target(encode, colour, (size, size), pixels, pixel_mask)   # M, [1, 4, h, w]
        latent = latent_mask(pixel_mask, tuple(target.shape[-2:])).to(self.device)
        prompt = code.settings.get("source_prompt", "") if prompt is None else prompt
        latents = colour_edit(self.noise_predictor(progress, graphed=True), code.to(self.device), latent, target.to(self.device),
                              strength, step_range, self.encode_prompts(prompt), self.encode_prompts(""))  # code's guidance
        return to_pil(self.decode(latents))[0]
