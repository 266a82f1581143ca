"""The regeneration's step, lever by lever: efddpm's SD1.x-sized UNet at batch 2 (a guided step of the reference
edit: 64x64 latents, fp16, channels_last), each lever alone, in one process, so that the ratios are of the same run.

    eager                        the UNet as it runs on the fast path's first call
    eager + CUDA graph           efddpm.app.fast.GraphedUNet (the fast path's regeneration)
    eager + graph, SDPA backend  the same with scaled_dot_product_attention held to one backend (flash, efficient,
                                 cudnn): which one PyTorch picks is not always the fastest at this shape
    compiled + graph             efddpm.app.fast.compiled (what --compile does), then captured
    compiled (max-autotune-no-cudagraphs) + graph
                                 inductor's autotuned kernels (slow to compile), then captured

Prints milliseconds per step (median of 50 after warm-up) and each lever's ratio to the eager + graph step, and
the output's largest difference from the eager one (fp16 rounding only). A lever that fails says why and the rest
go on. Compiling takes minutes:

    python benchmarks/step_levers.py --json levers.json          # on a GPU
    python benchmarks/step_levers.py --no-compile                # the eager levers only (~30 s)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from efddpm import UNet  # noqa: E402
from efddpm.app.fast import GraphedUNet, compiled  # noqa: E402


def milliseconds(step, repeats: int = 50) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled levers")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/step_levers.py needs a CUDA GPU")
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet().half().eval().requires_grad_(False).to(memory_format=torch.channels_last)
        x = torch.randn(2, 4, 64, 64, dtype=torch.float16)
        t = torch.full((2,), 500, dtype=torch.long)
        context = torch.randn(2, 77, 768, dtype=torch.float16)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": 2}
    with torch.inference_mode():
        reference = unet(x, t, context)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    levers = {"eager": lambda: unet, "eager_graph": lambda: GraphedUNet(unet)}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        levers[f"eager_graph_sdpa_{name}"] = (lambda b: lambda: (b, GraphedUNet(unet)))(backend)
    if not args.no_compile:
        levers["compiled_graph"] = lambda: GraphedUNet(compiled(unet))
        levers["compiled_max_autotune_graph"] = lambda: GraphedUNet(
            torch.compile(unet, mode="max-autotune-no-cudagraphs", dynamic=False))
    for name, make in levers.items():
        try:
            made = make()
            backend, f = made if isinstance(made, tuple) else (None, made)
            context_manager = sdpa_kernel([backend]) if backend is not None else torch.inference_mode()
            with torch.inference_mode(), context_manager:
                start = time.perf_counter()
                out = f(x, t, context)                               # compile and capture
                torch.cuda.synchronize()
                res[f"{name}_first_call_s"] = round(time.perf_counter() - start, 2)
                res[f"{name}_ms"] = round(milliseconds(lambda: f(x, t, context)), 3)
                res[f"{name}_max_abs_vs_eager"] = (out.float() - reference.float()).abs().max().item()
        except Exception as e:                                        # report, and go on to the next lever
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch._dynamo.reset()
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)
    base = res.get("eager_graph_ms")
    for name in levers:
        if base and f"{name}_ms" in res:
            res[f"{name}_vs_eager_graph"] = round(base / res[f"{name}_ms"], 3)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
