"""The factors PIE-Bench's tables print the metrics with (PnP Inversion, ICLR 2024, Table 1 headers):
structure distance x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2; PSNR (dB) and CLIP scores as they are."""
from __future__ import annotations

PIE_BENCH_SCALE = {"structure_distance": 1e3, "lpips": 1e3, "mse": 1e4, "ssim": 1e2}


def as_reported(scores: dict[str, float]) -> dict[str, float]:
    """The scores times their PIE-Bench factor (1 for a metric without one), to set beside the tables."""
    return {name: value * PIE_BENCH_SCALE.get(name, 1.0) for name, value in scores.items()}

# efddpm eval's metric names (efddpm.eval.scoring) -> the factor its tables print them with: PIE-Bench's
TABLE_SCALE = {"structure_distance": PIE_BENCH_SCALE["structure_distance"], "bg_lpips": PIE_BENCH_SCALE["lpips"],
               "bg_mse": PIE_BENCH_SCALE["mse"], "bg_ssim": PIE_BENCH_SCALE["ssim"]}
