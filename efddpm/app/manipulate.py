"""The paper's manipulations other than text-based editing, as methods of efddpm.app.editor.Editor (which inherits
them from here): image shifting and the colour manipulation (Sec. 4 of the paper; the mathematics is
efddpm.method.manipulations)."""
import warnings

from PIL import Image

from efddpm.app.images import load_image, load_mask, to_pil
from efddpm.app.networks import Progress
from efddpm.core import checks
from efddpm.core.checks import InputError
from efddpm.method.defaults import default_colour_range
from efddpm.method.latent_code import LatentCode
from efddpm.method.manipulations import colour_edit, colour_target, latent_mask, shift_code


class SettingWarning(UserWarning):
    """A setting that will likely not do what it is meant to (e.g. a colour manipulation on a guided code)."""


class Manipulations:
    """Editor's shift and recolor; they use the Editor's checks, networks and defaults."""

    def shift(self, code: LatentCode, dy: int, dx: int, prompt: str | None = None, *, skip: int | None = None,
              progress: Progress | None = None) -> Image.Image:
        """The paper's image shifting: x_T and every noise map z_t moved by (dy, dx) latent pixels (circularly, see
        efddpm.method.manipulations.shift for the border), regenerated under the source prompt (or `prompt`) with the code's
        own guidance: the output is the image shifted by (dy, dx) latent pixels.

        skip: start from the shifted x_{T-skip} with the shifted z_{T-skip}..z_1, all of the code that this
        regeneration reads (unshifted, it is still the exact reconstruction). None: the model's shift_skip_fraction
        of the code's steps (the embedded shapes model: 0.5, 50 of 100), else the paper's 0 (from x_T).
        Why the shapes model starts later: its UNet on 16x16 latents is far from shift-equivariant and the source
        guidance amplifies that step by step (measured on the first shapes model, 2026-11-29; the shipped file's
        figures are in tests/test_manipulations_model.py): from the shifted x_T the output left the shifted
        trajectory by a relative latent error of 0.67 at w 3.5, 0.18 at w 1. With codes at w 3.5, 10 held-out
        pictures shifted by up to 4 latent pixels: from x_T 2 of 10 shapes landed within 2 px of 4 (dy, dx) (median
        miss 3.6 px, max 10), from 50 of 100 steps 10 of 10 (max 1.6 px), from 36 of 100 9 of 10."""
        self.check_code(code)
        dy, dx = checks.shift(dy, dx, tuple(code.x_T.shape[-2:]))
        skip = self.shift_skip(code.num_steps) if skip is None else skip
        prompt = code.settings.get("source_prompt", "") if prompt is None else self.prompt_list(prompt, "prompt")[0]
        latents = self.regenerate(shift_code(code, dy, dx), prompt, guidance=None, skip=skip, progress=progress)
        return to_pil(self.decode(latents))[0]

    def recolor(self, code: LatentCode, image, mask, colour: tuple[float, float, float], *,
                strength: float | None = None, step_range: tuple[int, int] | None = None, prompt: str | None = None,
                size: int | None = None, progress: Progress | None = None) -> Image.Image:
        """The paper's colour manipulation: regenerate the code from x_T under the source prompt (or `prompt`) with
        its own guidance, replacing z_t by z_t + s * B * (M - P(f_t(x_t))) for t in step_range [T1, T2]; B is the
        mask on the latent grid, M the latent of the image with the masked region painted `colour` (RGB in [0, 1]).
        `mask`: anything efddpm.app.images.load_mask takes, the size of `image`; white = edit, transparent = not.

        strength None: self.colour_strength, the model's own (the embedded shapes model: 1.0), else the paper's 0.2.
        step_range None: 1..40 of 100 (the paper's), scaled to the code's steps.

        The code's source guidance w decides whether the colour can change. When the source prompt names the old
        colour, as every caption of the shapes model does, the guided prediction f_u + w (f_c - f_u) holds it for w
        > 1: on the first shapes model (2026-11-29) P(f_t(x_t)) moves by -0.9 to -0.3 times a change of x_t towards
        M at w 3.5 (t = 60..10), +0.35 to +0.65 at w 1, +0.9 to +1.0 without guidance, and the push, which enters
        the step as sigma_t times itself (sigma_t 0.02-0.19 for t in 1..40), loses. So that model's file recommends
        inverting with colour_source_guidance 0 (the caption given no weight); a code with more guidance gets a
        warning. 10 held-out pictures, t in 1..40: at w 0 the target colour was reached 5 of 10 times at s 0.2 and
        10 of 10 at s 0.5, 1 and 2 (s 1: median RGB distance 3, the rest of the picture within 0.23 / 255 on average
        of the plain reconstruction); at w 3.5 and s 1, 0 of 10."""
        self.check_code(code)
        if code.settings["skip"] > 0:
            raise InputError(f"the colour manipulation regenerates from x_T, and this code was inverted for edits "
                             f"with skip >= {code.settings['skip']}; invert with skip=0")
        limit = self.models.defaults.get("colour_source_guidance")
        guidance = code.settings.get("guidance")
        if limit is not None and isinstance(guidance, (int, float)) and guidance > limit:
            warnings.warn(f"this code was inverted with source guidance {guidance}; this model's colour manipulation "
                          f"needs {limit} or less (the guidance holds the colour the source prompt names)",
                          SettingWarning, stacklevel=2)
        strength = checks.strength(self.colour_strength if strength is None else strength)
        step_range = checks.step_range(default_colour_range(code.num_steps) if step_range is None else step_range,
                                       code.num_steps)
        if not isinstance(colour, (tuple, list)) or len(colour) != 3:
            raise InputError(f"colour must be (r, g, b) in [0, 1], got {colour!r}")
        colour = tuple(checks.number("colour", c, low=0.0, high=1.0) for c in colour)
        size = self.check_size(size)
        pixels, _ = load_image(image, size)                                       # [1, 3, size, size]
        pixel_mask = load_mask(mask, size)[0].float()                             # [1, 1, size, size], not empty
        encode = lambda img: self.encode_image(img[0] * 0.5 + 0.5, size)[0]
        target = colour_target(encode, colour, (size, size), pixels, pixel_mask)   # M, [1, 4, h, w]
        latent = latent_mask(pixel_mask, tuple(target.shape[-2:])).to(self.device)
        prompt = code.settings.get("source_prompt", "") if prompt is None else self.prompt_list(prompt, "prompt")[0]
        latents = colour_edit(self.noise_predictor(progress, graphed=True), code.to(self.device), latent,
                              target.to(self.device), strength, step_range, self.encode_prompts(prompt),
                              self.encode_prompts(""))                              # the code's guidance
        return to_pil(self.decode(latents))[0]
