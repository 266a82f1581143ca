"""Measuring edits as the paper (Sec. 4) and PIE-Bench (PnPInversion's evaluation) do, on 8-bit pictures.

    background_scores   PSNR, MSE, SSIM of the edit against the source on the unedited region   (background.py)
    CLIPScorer          CLIP score of an image against a prompt, whole or on the edited region  (clip_score.py)
    LPIPS               Zhang et al.'s perceptual distance (alex, vgg, squeeze), whole or masked (lpips.py)
    background_lpips    PIE-Bench's background LPIPS (squeeze) on the unedited region           (lpips.py)
    StructureDistance   DINO ViT-B/8 self-similarity of the last layer's keys, MSE between two   (structure.py,
                        dino.py)
    PIE_BENCH_SCALE     the factors the published tables print the numbers with                  (scales.py)

The metrics need the `eval` extra (pip install "efddpm[eval]": torchmetrics, transformers); it is imported when
a metric first runs, so `import efddpm.eval` works without it. docs/evaluation.md gives each definition, its
reference and the weights it needs.
"""
from efddpm.eval.background import background_scores, mse, psnr, ssim
from efddpm.eval.clip_score import DEFAULT_CLIP, CLIPScorer
from efddpm.eval.lpips import LPIPS, background_lpips
from efddpm.eval.pixels import edited_region, rgb_pixels, unedited_region
from efddpm.eval.scales import PIE_BENCH_SCALE, as_reported
from efddpm.eval.structure import StructureDistance, dino_weights
