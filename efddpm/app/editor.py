"""The main job as a Python API: invert a real image under a source prompt, then edit it with target prompts.

    editor = Editor.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    code = editor.invert("cat.png", "a photo of a cat", seed=0)       # LatentCode: x_T, z_T..z_1, trajectory, settings
    dog, = editor.edit(code, "a photo of a dog")                      # PIL images, one per target prompt
    dog, = editor.edit(code, "a photo of a dog", p2p=P2P(xa=0.6))     # with Prompt-to-Prompt (efddpm.method.p2p)
    code.save("cat.safetensors")                                      # LatentCode.load(...) to edit again later

Images become x_0 = the mode (mean) of the VAE posterior times the scaling factor (0.18215 for SD1.x), never a
sample; prompts become CLIP's last hidden state. The UNet runs in the editor's dtype; the method keeps x_t and
the noise maps in at least float32 and divides by sigma_t (0.02 at the last step) there, never in half precision.
An empty source prompt means no guidance term during the inversion, as in the authors' code; otherwise
eps = f("") + w (f(prompt) - f("")).

Defaults are the paper's (efddpm.method.defaults), except where the model's file recommends its own (models.defaults:
the embedded shapes model's target guidance 7.5). Every argument is checked (efddpm.core.checks): a bad one raises
InputError, a ValueError with a one-line message.
"""
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
from PIL import Image

from efddpm.app import prompt_to_prompt
from efddpm.app.fast import GraphedUNet, LibraryWarmUp, compiled, extract_noise_batched, inversion_chunk
from efddpm.app.images import load_image, to_pil
from efddpm.app.manipulate import Manipulations, SettingWarning  # noqa: F401 (SettingWarning: part of this API)
from efddpm.app.overlap import PendingNoise
from efddpm.app.networks import Progress, decode_latents, encode_pictures, encode_prompts, unet_predictor
from efddpm.checkpoint import CheckpointError, StableDiffusionModels, load
from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.method.defaults import (COLOUR_STRENGTH, ETA, SHIFT_SKIP_FRACTION, SOURCE_GUIDANCE, STEPS, TARGET_GUIDANCE,
                       default_skip)
from efddpm.method.inversion import extract_noise, invert as invert_latents, regenerate
from efddpm.method.latent_code import LatentCode
from efddpm.method.p2p import P2P
from efddpm.method.scheduler import SD1, check_alphas_cumprod, diffusers_config, max_steps


def check_schedule(models: StableDiffusionModels) -> None:
    """Refuse a checkpoint whose training noise schedule is not SD1.x's (the method's grid assumes it)."""
    if models.alphas_cumprod is not None:
        try:
            check_alphas_cumprod(models.alphas_cumprod, SD1)
        except ValueError as e:
            raise CheckpointError(f"{models.source}: {e}") from None
    cfg = models.scheduler_config or {}
    expected = {k: v for k, v in diffusers_config(SD1).items()
                if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    different = {k: cfg[k] for k, v in expected.items() if k in cfg and cfg[k] != v}
    if different:
        raise CheckpointError(f"{models.source}: scheduler_config.json has {different}, SD1.x's schedule is {expected}")


def _guidance_list(value, n: int) -> list[float] | float:
    """Checked guidance: one number, or a list of one per prompt."""
    return checks.guidances(value, n)[0] if not isinstance(value, (list, tuple)) else checks.guidances(value, n)


NOT_FINITE = ("the result holds NaN or infinite values (a guidance or strength too large for this model and dtype?); "
              "nothing was written")


class PromptWarning(UserWarning):
    """A prompt longer than the text encoder reads (75 tokens): it is cut."""


@dataclass
class Editor(Manipulations):
    """The models of one checkpoint, and the edit-friendly inversion and editing of images with them.

    fast (from_pretrained: on for CUDA): half-precision inversions batched over timesteps, the regeneration
    replayed from CUDA graphs, the UNet in channels_last (efddpm.app.fast). Same formulas."""
    models: StableDiffusionModels
    dtype: torch.dtype
    fast: bool = False
    graphed_unet: GraphedUNet | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.fast and self.device.type != "cuda":   # CUDA graphs and the batched half-precision path need a GPU
            raise InputError(f"fast=True needs the models on a CUDA device; they are on {self.device}")

    @classmethod
    def from_pretrained(cls, source: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        revision: str | None = None, offline: bool | None = None) -> "Editor":
        """A hub id, a diffusers folder or a single-file checkpoint (see efddpm.checkpoint.load)."""
        device = checks.device(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating torch dtype, got {dtype!r}")
        fast = device.type == "cuda"
        warm_up = LibraryWarmUp(device, dtype) if fast else None                # beside the reading and building
        try:
            models = load(source, device=device, dtype=dtype, revision=revision, offline=offline)
        finally:
            if warm_up is not None:
                warm_up.join()
        check_schedule(models)
        if fast:
            models.unet.to(memory_format=torch.channels_last)
        return cls(models, dtype, fast=fast)

    def compile(self) -> "Editor":
        """torch.compile the UNet (efddpm.app.fast.compiled: persistent caches); the first edit of each shape
        compiles. Needs the fast path (CUDA). Prompt-to-Prompt regenerations still run the uncompiled UNet
        (efddpm.app.fast.GraphedUNet), their inversions the compiled one. Returns self."""
        if not self.fast:
            raise InputError(f"compiling needs the models on a CUDA device; they are on {self.device}")
        from torch._dynamo.eval_frame import OptimizedModule               # (not at import: it costs ~1 s)
        if isinstance(self.models.unet, OptimizedModule):
            return self                                                     # compiled already
        self.models.unet = compiled(self.models.unet)
        self.graphed_unet = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.models.unet.parameters()).device

    @property
    def target_guidance(self) -> float:
        """The default target guidance: the model's own when its file recommends one (the embedded shapes model:
        7.5; at 15 its edits over-saturate), else the paper's 15."""
        return float(self.models.defaults.get("target_guidance", TARGET_GUIDANCE))

    @property
    def colour_strength(self) -> float:
        """The default strength s of the colour manipulation: the model's own, else the paper's 0.2."""
        return float(self.models.defaults.get("colour_strength", COLOUR_STRENGTH))

    @property
    def colour_source_guidance(self) -> float:
        """The source guidance to invert with before a colour manipulation: the model's own (0 for the embedded
        shapes model), else the paper's 3.5."""
        return float(self.models.defaults.get("colour_source_guidance", SOURCE_GUIDANCE))

    def shift_skip(self, num_steps: int) -> int:
        """The skip image shifting starts from: the model's shift_skip_fraction of the steps (the embedded shapes
        model: 50 of 100), else the paper's 0 (from x_T)."""
        return round(self.models.defaults.get("shift_skip_fraction", SHIFT_SKIP_FRACTION) * num_steps)

    # ------------------------------------------------------------------ checks that need the model

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel of the coarsest UNet level: picture sides must be multiples of it."""
        vae_levels = len(self.models.vae.config.channel_mult) - 1
        unet_levels = len(self.models.unet.config.channel_mult) - 1
        return 2 ** (vae_levels + unet_levels)

    def latent_side(self, size: int | None = None) -> int:
        return (size or self.models.image_size) // 2 ** (len(self.models.vae.config.channel_mult) - 1)

    def check_size(self, size: int | None, name: str = "size", samples: int = 2) -> int:
        """The picture side: a positive multiple of self.downsampling whose largest activations fit in the
        device's memory (an estimate from the configs, not from what is free now)."""
        if size is None:
            return self.models.image_size
        factor = self.downsampling
        size = checks.integer(name, size, low=1)
        if size % factor:
            raise InputError(f"{name} must be a multiple of {factor} for this model (its VAE and UNet halve the "
                             f"picture {factor.bit_length() - 1} times), got {size}")
        need, have = self.memory_estimate(size, samples), checks.memory_bytes(self.device)
        if need > have:
            raise InputError(f"{name} {size} needs about {need / 2**30:.0f} GiB for this model, more than the "
                             f"{have / 2**30:.0f} GiB of {self.device.type}")
        return size

    def memory_estimate(self, size: int, samples: int = 2) -> int:
        """Bytes of the largest activations at this picture side: the UNet's feature maps (~28 maps of
        model_channels per sample, measured on SD1.x) and its finest attention matrix, and the VAE's full-size
        maps and mid-block attention; a bound to refuse impossible sizes, not a prediction."""
        u, v, item = self.models.unet.config, self.models.vae.config, self.dtype.itemsize
        side = self.latent_side(size)
        maps = 28 * u.model_channels * side * side * item * samples
        level = min(u.attention_levels, default=None)
        tokens = (side // 2 ** level) ** 2 if level is not None else 0
        attention = u.num_heads * tokens ** 2 * item * samples
        vae_maps = 6 * v.base_channels * v.channel_mult[0] * size * size * item
        vae_attention = side ** 4 * item
        return maps + max(attention, vae_maps, vae_attention)

    def prompt_list(self, prompts, name: str = "prompts") -> list[str]:
        """One prompt or a non-empty list of them, as a list of strings."""
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
        return list(prompts)

    def check_code(self, code, targets: int = 1, values: bool = True) -> None:
        """A latent code this model can regenerate: checked settings and tensors (values False: all but the values,
        for a code whose noise maps are still being computed), latents with the UNet's channels, one row or one per
        target."""
        if not isinstance(code, LatentCode):
            raise InputError(f"code must be a LatentCode, got {type(code).__name__}")
        if values:
            code.check()
        shape, channels = tuple(code.x_T.shape), self.models.unet.config.in_channels
        if len(shape) != 4 or shape[1] != channels:
            raise InputError(f"the code's latents are {list(shape)}, this model's are [B, {channels}, h, w]")
        if shape[0] not in (1, targets):
            raise InputError(f"the code holds {shape[0]} inversions and there are {targets} prompts: give one prompt "
                             f"per inversion, or a code of one")

    def check_output(self, latents: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(latents).all()):
            raise InputError(NOT_FINITE)
        return latents

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
        prompts = self.prompt_list(prompts)
        for message in self.prompt_warnings(prompts):
            warnings.warn(message, PromptWarning, stacklevel=3)
        return encode_prompts(self.models.tokenizer, self.models.text_encoder, prompts)  # [B, 77, width]

    @torch.inference_mode()
    def encode_image(self, image, size: int | None = None) -> tuple[torch.Tensor, str]:
        """Image (path, PIL, uint8 numpy, [3, H, W] tensor: float in [0, 1] or uint8) -> x_0 [1, 4, size/f, size/f]
        in the method's dtype (float32, float64 for a float64 editor), and a line saying how the image was
        cropped and resized (efddpm.app.images)."""
        pixels, note = load_image(image, self.check_size(size))              # [1, 3, size, size] in [-1, 1]
        return self.encode_pictures(pixels), note

    @torch.inference_mode()
    def encode_pictures(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pictures [B, 3, H, W] in [-1, 1] -> x_0 [B, 4, H/f, W/f] in the method's dtype (efddpm.app.networks)."""
        return encode_pictures(self.models.vae, pixels, dtype=self.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1] (float32); refuses non-finite latents."""
        return decode_latents(self.models.vae, self.check_output(latents), dtype=self.dtype)

    def noise_predictor(self, progress: Progress | None = None, graphed: bool = False):
        """f(x_t, t, text) for efddpm.method.inversion: the UNet in the editor's dtype (the method upcasts its output);
        graphed: replayed from CUDA graphs (the fast path's sequential regeneration)."""
        unet = self.models.unet
        if graphed and self.fast:
            self.graphed_unet = self.graphed_unet or GraphedUNet(unet)
            unet = self.graphed_unet
        return unet_predictor(unet, dtype=self.dtype, progress=progress)

    # ------------------------------------------------------------------ the job

    def invert(self, image, source_prompt: str = "", *, steps: int = STEPS, guidance: float = SOURCE_GUIDANCE,
               eta: float = ETA, seed: int | None = None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, size: int | None = None, skip: int = 0, chunk: int | None = None,
               progress: Progress | None = None, overlap: PendingNoise | None = None) -> LatentCode:
        """Edit-friendly inversion (Algorithm 1) of one image under the source prompt (`steps - skip` network calls).

        Randomness, one of: seed (a torch.Generator on the editor's device seeded with it), generator (yours),
        noise (the eps~ of eq. 6 themselves, [steps, 1, 4, h, w]: an auditor can feed another implementation's
        draws); none: torch's global generator. skip: the code serves edits with that skip or more (the noisier
        steps are left out). chunk: timesteps per batched UNet call (the fast path's choice when None; recorded).
        overlap: with a batched inversion (chunk > 1), compute nothing yet: the code's noise maps are computed as a
        regeneration given the same `overlap` asks for them (Editor.invert_and_edit; efddpm.app.overlap).
        """
        steps = checks.steps(steps, max_steps())
        skip = checks.skip(skip, steps)
        eta = checks.inversion_eta(eta)
        if sum(x is not None for x in (seed, generator, noise)) > 1:
            raise InputError("give at most one of seed, generator and noise")
        if not isinstance(source_prompt, str):
            raise InputError(f"source_prompt must be a string, got {type(source_prompt).__name__}")
        x0, note = self.encode_image(image, size)
        if noise is not None:
            checks.finite_tensor("noise", noise)
            if tuple(noise.shape) != (steps, *x0.shape):
                raise InputError(f"noise must have shape {[steps, *x0.shape]} (steps, then the latent's), "
                                 f"got {list(noise.shape)}")
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(checks.seed(seed))
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        uncond = self.encode_prompts("")
        cond = self.encode_prompts(source_prompt) if source_prompt else None  # "": no guidance term
        guidance = checks.guidance(guidance) if cond is not None else None
        fallback = chunk is None and self.fast
        chunk = checks.integer("chunk", self.inversion_chunk(x0, steps - skip, cond is not None) if chunk is None
                               else chunk, low=1)
        state = None if generator is None else generator.get_state()

        def run(chunk: int) -> LatentCode:
            return self.run_inversion(x0, cond, uncond, guidance, steps=steps, eta=eta, skip=skip, chunk=chunk,
                                      generator=generator, noise=noise, progress=progress,
                                      source_prompt=source_prompt, note=note, overlap=overlap)
        try:
            return run(chunk)
        except torch.OutOfMemoryError:
            if not fallback or chunk == 1:
                raise
        # out of the except block, so the failed attempt's activations are freed before the retry
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if state is not None:
            generator.set_state(state)       # the same draws as the batched attempt
        return run(1)                         # one timestep per call: fits wherever the regeneration fits

    def inversion_chunk(self, x0: torch.Tensor, steps: int, guided: bool) -> int:
        """Timesteps per UNet call of an inversion of x0 [B, 4, h, w] over `steps` steps: the fast path's choice
        (efddpm.app.fast.inversion_chunk, from the shapes and dtype), else 1 (the literal Algorithm 1)."""
        return inversion_chunk(x0, steps, x0.shape[0] * (2 if guided else 1), self.dtype) if self.fast else 1

    def run_inversion(self, x0: torch.Tensor, cond, uncond, guidance, *, steps: int, eta: float | None, skip: int,
                      chunk: int, generator=None, noise=None, progress: Progress | None = None,
                      source_prompt: str, note: str, method: str = "edit_friendly",
                      overlap: PendingNoise | None = None) -> LatentCode:
        """Algorithm 1 (or efddpm.method.inversion.invert's other `method`) on checked inputs (x0 [B, 4, h, w]), `chunk`
        timesteps per UNet call (CUDA graphs at 1; "ddim": pass 1), the code's settings recording the prompt, model,
        resize note, dtype and chunk (Editor.invert and efddpm.app.batched both run it). overlap: Editor.invert's."""
        extract = extract_noise if chunk == 1 else partial(extract_noise_batched, chunk=chunk)
        if overlap is not None and chunk > 1:
            extract = partial(overlap.extract, chunk=chunk)
        return invert_latents(
            method, self.noise_predictor(progress, graphed=chunk == 1), x0, cond, uncond, guidance, num_steps=steps,
            eta=eta, generator=generator, noise=noise, skip=skip, extract=extract,
            meta={"source_prompt": source_prompt, "model": self.models.source, "image": note,
                  "model_dtype": str(self.dtype).removeprefix("torch."), "chunk": chunk})

    def regenerate(self, code: LatentCode, prompts: str | list[str], *, guidance: float | list[float] | None = None,
                   skip: int | None = None, eta: float | None = None, progress: Progress | None = None,
                   overlap: PendingNoise | None = None, **options) -> torch.Tensor:
        """Eq. 3 replayed with the code's noise maps under each prompt, from T - skip -> x_0 latents [K, 4, h, w].
        guidance None: the code's source guidance (none for a code of an empty source prompt: then f(x, t, prompt)).
        skip None: T_skip = 36 of 100 scaled to the code's steps. options: those of efddpm.method.inversion.regenerate
        (zero_last_noise, reference_direction, noise_edit). overlap: the one the code was inverted with (its noise maps
        are computed as the steps ask for them, and the code is checked once they all are)."""
        prompts = self.prompt_list(prompts)
        pending = overlap is not None and overlap.chunks is not None
        self.check_code(code, len(prompts), values=not pending)
        n = code.num_steps
        skip = checks.skip(default_skip(n) if skip is None else skip, n, inverted_skip=code.settings["skip"])
        guidance = None if guidance is None else _guidance_list(guidance, len(prompts))
        eta = None if eta is None else checks.eta(eta)
        f = self.noise_predictor(progress, graphed=True)
        run = partial(regenerate, f, code.to(self.device), self.encode_prompts(prompts), self.encode_prompts(""),
                      guidance, skip=skip, eta=eta, **options)
        latents = overlap.regenerating(run) if pending else run()          # [K, 4, h, w]
        if pending:
            code.check()
        return self.check_output(latents)

    def edit(self, code: LatentCode, target_prompts: str | list[str], *, guidance: float | list[float] | None = None,
             skip: int | None = None, eta: float | None = None, output: str = "pil",
             progress: Progress | None = None, p2p: P2P | None = None,
             overlap: PendingNoise | None = None) -> list[Image.Image] | torch.Tensor:
        """Edited images, one per target prompt: PIL images, or a tensor [K, 3, H, W] in [-1, 1] (output="tensor").
        guidance: one weight, or one per prompt; None: self.target_guidance. skip None: 36 of 100, scaled.
        p2p: Prompt-to-Prompt (efddpm.method.p2p.P2P: xa, sa, blend, reweight, window) on the code's source row,
        regenerated beside the targets under the code's source prompt and guidance (docs/prompt_to_prompt.md).
        overlap: the one the code was inverted with (Editor.invert_and_edit)."""
        guidance = self.target_guidance if guidance is None else guidance
        if output not in ("pil", "tensor"):
            raise InputError(f"output must be 'pil' or 'tensor', not {output!r}")
        if p2p is not None:
            if overlap is not None:
                overlap.finish()                       # Prompt-to-Prompt regenerates from a whole code
            latents = prompt_to_prompt.edit_latents(self, code, self.prompt_list(target_prompts), p2p,
                                                    guidance=guidance, skip=skip, eta=eta, progress=progress)
        else:
            latents = self.regenerate(code, target_prompts, guidance=guidance, skip=skip, eta=eta, progress=progress,
                                      overlap=overlap)
        images = self.decode(latents)
        return images if output == "tensor" else to_pil(images)

    def invert_and_edit(self, image, source_prompt: str, target_prompts: str | list[str], *, steps: int = STEPS,
                        source_guidance: float = SOURCE_GUIDANCE, guidance: float | list[float] | None = None,
                        skip: int | None = None, eta: float = ETA, seed: int | None = None,
                        noise: torch.Tensor | None = None, size: int | None = None, output: str = "pil",
                        progress: Progress | None = None,
                        p2p: P2P | None = None) -> tuple[list[Image.Image] | torch.Tensor, LatentCode]:
        """Editor.invert, then Editor.edit of that code with the same skip (None: 36 of 100, scaled): (images, code).
        On the fast path a batched inversion overlaps with the regeneration (efddpm.app.overlap): the regeneration's
        step t starts as soon as z_t is computed, on another CUDA stream. Same bits as the two calls."""
        skip = default_skip(checks.steps(steps, max_steps())) if skip is None else skip

        def run(overlap: PendingNoise | None):
            code = self.invert(image, source_prompt, steps=steps, guidance=source_guidance, eta=eta, seed=seed,
                               noise=noise, size=size, skip=skip, progress=progress, overlap=overlap)
            return self.edit(code, target_prompts, guidance=guidance, skip=skip, eta=eta, output=output,
                             progress=progress, p2p=p2p, overlap=overlap), code
        if not self.fast:
            return run(None)
        try:
            return run(PendingNoise(torch.cuda.Stream(self.device)))
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()   # out of the except block: the failed attempt's tensors are freed
        return run(None)           # one after the other (Editor.invert falls back to one timestep per call)
