"""The arguments of the `efddpm` command: one subparser per subcommand (efddpm.app.cli.commands runs them)."""
import argparse

import torch

from efddpm.core.version import VERSION
from efddpm.app.embedded import DEFAULT_MODEL
from efddpm.core.checks import InputError
from efddpm.method.defaults import ETA, P2P_CROSS_FRACTION, P2P_SELF_FRACTION, SOURCE_GUIDANCE, STEPS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class UsageError(InputError):
    """A bad argument: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, exit code 2
        command = self.prog.removeprefix("efddpm").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def build_parser(extra: dict | None = None) -> Parser:
    """The parser of every subcommand; extra: name -> (add(subparsers), run) of subcommands from above the app."""
    parser = Parser(prog="efddpm", description="Edit real images with the edit-friendly DDPM noise space (SD1.x).")
    parser.add_argument("--version", action="version", version=f"efddpm {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def model_flags(p):
        p.add_argument("--model", help=f"hub id, diffusers folder or single file (default: the embedded "
                                       f"shapes model, {DEFAULT_MODEL.name}; real photos need SD1.5)")
        p.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
        p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on CUDA, float32 on CPU")
        p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
        p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA): the first run on a "
                       "machine compiles for a minute or two, later runs read PyTorch's cache in ~15 s (a --p2p "
                       "regeneration runs uncompiled)")

    def inversion_flags(p, with_source=True, with_noise=False, cfg_src=SOURCE_GUIDANCE,
                        cfg_src_help="source guidance (default: %(default)s)",
                        seed_help="default: drawn at random and recorded in the outputs"):
        if with_source:
            p.add_argument("--source", default="", help='source prompt ("" = no guidance term during inversion)')
        p.add_argument("--steps", type=int, default=STEPS, help="sampling steps N (default: %(default)s)")
        p.add_argument("--cfg-src", type=float, default=cfg_src, help=cfg_src_help)
        p.add_argument("--eta", type=float, default=ETA, help="DDPM eta, in (0, 1] (default: %(default)s)")
        p.add_argument("--seed", type=int, help=seed_help)
        p.add_argument("--size", type=int, help="picture side in pixels (default: the model's, 512 for SD1.x)")
        if with_noise:
            p.add_argument("--noise", help="the inversion's eps~ draws instead of a seed: a .safetensors file with one "
                                           "tensor [steps, 1, 4, h, w]")

    def edit_flags(p):
        p.add_argument("--target", action="append", required=True, help="target prompt (repeatable)")
        p.add_argument("--cfg-tgt", type=float, nargs="+",
                       help="target guidance: one value, or one per target (default: the model's, else the paper's 15; "
                            "the embedded shapes model's is 7.5)")
        p.add_argument("--skip", type=int, help="T_skip: steps left out at the start (default: 36 of 100, scaled to "
                                                "--steps)")

    def p2p_flags(p):
        g = p.add_argument_group("Prompt-to-Prompt", "inject the source row's attention maps into the edits "
                                 "(docs/prompt_to_prompt.md); the flags below need --p2p")
        g.add_argument("--p2p", action="store_true", help="edit with Prompt-to-Prompt: word swap when source and "
                                                          "target have equally many words, else phrase addition")
        g.add_argument("--xa", type=float, help=f"fraction of the steps with cross-attention injected (default: "
                                                f"{P2P_CROSS_FRACTION})")
        g.add_argument("--sa", type=float, help=f"fraction of the steps with self-attention injected, in layers of "
                                                f"<= 256 pixels (default: {P2P_SELF_FRACTION})")
        g.add_argument("--p2p-window", choices=["all", "run"], help="what --xa and --sa are fractions of: all N "
                       "steps, counted from the skip point (the authors'), or the N - skip steps run (default: all)")
        g.add_argument("--blend", nargs="+", metavar="WORD", help="local blend: change only where these words of "
                                                                  "the source or target prompt attend")
        g.add_argument("--reweight", action="append", metavar="WORD=SCALE",
                       help="scale the attention of a target word (repeatable)")

    def output_flags(p, what):
        p.add_argument("--out", default=".", help=f"folder for the {what}, created if missing (default: %(default)s)")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = commands.add_parser("edit", help="invert an image and edit it with target prompts")
    p.add_argument("image")
    inversion_flags(p, with_noise=True), edit_flags(p), p2p_flags(p), model_flags(p), output_flags(p, "edited PNGs")
    p.add_argument("--num-inversions", type=int, default=1, help="several inversions (seeds) for diverse edits")
    p.add_argument("--grid", action="store_true", help="also write a side-by-side grid (input | edits)")

    p = commands.add_parser("invert", help="invert an image; write its latent code (.safetensors)")
    p.add_argument("image")
    inversion_flags(p, with_noise=True), model_flags(p)
    p.add_argument("-o", "--output", required=True, help="the latent code file, .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing code file")

    p = commands.add_parser("regenerate", help="edit a saved latent code with target prompts")
    p.add_argument("code", help="a .safetensors latent code written by `efddpm invert`")
    edit_flags(p), p2p_flags(p), model_flags(p), output_flags(p, "PNGs")

    p = commands.add_parser("shift", help="the paper's image shifting: shift the noise maps of an inversion and regenerate")
    p.add_argument("image")
    inversion_flags(p), model_flags(p), output_flags(p, "shifted PNG")
    p.add_argument("--skip", type=int, help="regenerate from the shifted x_{T-skip} (default: the model's "
                                            "shift_skip_fraction of --steps, 50 of 100 for the embedded shapes "
                                            "model; else the paper's 0, from x_T)")
    p.add_argument("--dx", type=int, default=0, help="latent pixels to the right (x8 image pixels on SD1.x)")
    p.add_argument("--dy", type=int, default=0, help="latent pixels down")

    p = commands.add_parser("recolor", help="the paper's colour manipulation of a masked region")
    p.add_argument("image")
    inversion_flags(p, cfg_src=None, cfg_src_help="source guidance of the inversion (default: the model's "
                    "colour_source_guidance, 0 for the embedded shapes model, whose captions name the colour that "
                    "the guidance holds; else the paper's 3.5)")
    model_flags(p), output_flags(p, "recoloured PNG")
    p.add_argument("--mask", required=True, help="image of the same size as IMAGE; white = region to recolour "
                                                 "(transparent = outside it)")
    p.add_argument("--color", required=True, help='"#rrggbb" or "r,g,b" (0-255)')
    p.add_argument("--strength", type=float, help="s: how hard z_t is pushed towards the colour (default: the "
                                                  "model's colour_strength, 1.0 for the embedded shapes model; else "
                                                  "the paper's 0.2)")
    p.add_argument("--t-range", type=int, nargs=2, metavar=("T1", "T2"),
                   help="the steps t (1 = last) in which z_t is pushed (default: 1..40 of 100, scaled to --steps)")

    p = commands.add_parser("batch", help="edit many images listed in a JSON, TOML or YAML file, or PIE-Bench's, by "
                                          "edit-friendly inversion or one of the paper's comparisons (--method)")
    p.add_argument("file", help='a JSON list of {"image", "source", "targets"} (TOML: [[edit]] tables), an entry '
                                "may also set id, p2p, xa, sa, p2p_window, blend (words) and reweight ({word: scale}), "
                                "over the flags; or the authors' dataset YAML (init_img, source_prompt, "
                                "target_prompts; needs PyYAML); or PIE-Bench's mapping_file.json (with --image-root)")
    p.add_argument("--image-root", metavar="DIR", help="the folder that image paths are relative to (default: the "
                                                       "file's; PIE-Bench: its annotation_images, required)")
    inversion_flags(p, with_source=False, seed_help="the run seed; each item's seed is derived from it and the "
                    "item's id (default: the one the manifest in --out records, else drawn at random and recorded)",
                    cfg_src=None, cfg_src_help=f"source guidance of the inversion (default: {SOURCE_GUIDANCE}; "
                    "--method sdedit inverts nothing and refuses it)")
    p2p_flags(p), model_flags(p)
    from efddpm.app.batched import METHODS
    from efddpm.method.defaults import P2P_DDIM_CROSS_FRACTION as DDIM_XA, P2P_DDIM_SELF_FRACTION as DDIM_SA
    p.add_argument("--method", choices=METHODS, default=METHODS[0], help="how the items are edited (default: "
                   "%(default)s): edit-friendly, the paper's inversion (Algorithm 1) and regeneration; native, the "
                   "native DDPM inversion (forward chain, eq. 1), same regeneration; ddim, DDIM inversion under "
                   "--cfg-src, deterministic regeneration from T - skip (it takes no --eta; with --p2p, --xa and --sa "
                   f"default to the authors' DDIM + P2P {DDIM_XA} and {DDIM_SA}); sdedit, no inversion: the picture "
                   "noised to T - skip with fresh noise, then sampled under each target (it takes no --cfg-src and no "
                   "--p2p; --eta is its sampling's)")
    p.add_argument("--out", default=".", help="folder for the edited PNGs (<id>_<k>.png) and manifest.jsonl, created "
                                              "if missing; a rerun resumes there (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="start over: forget earlier manifests of --out and "
                                                            "replace every output")
    p.add_argument("--cfg-tgt", type=float, help="target guidance (default: the model's, else the paper's 15)")
    p.add_argument("--skip", type=int, help="T_skip (default: 36 of 100, scaled to --steps)")
    p.add_argument("--batch-size", type=int, metavar="K", help="items inverted and edited together (default: 16 on "
                   "CUDA, 1 on the CPU); K = 1 gives each item the bytes of `efddpm edit`, K > 1 the same edits up to "
                   "rounding, at a higher throughput")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (0 <= I < N), chosen by the items' ids; "
                                                  "under torchrun the rank and world size choose it")
    for add, _ in (extra or {}).values():
        add(commands)
    return parser
