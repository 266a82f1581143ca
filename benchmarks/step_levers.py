"""The regeneration's step, lever by lever: efddpm's SD1.x-sized UNet at batch 2 (a guided step of the reference
edit: 64x64 latents, fp16, channels_last), each lever alone, in one process, so that the ratios are of the same run.

    eager                        the UNet as it runs on the fast path's first call
    eager + CUDA graph           efddpm.app.fast.GraphedUNet (the fast path's regeneration)
    eager + graph, SDPA backend  the same with scaled_dot_product_attention held to one backend (flash, efficient,
                                 cudnn): which one PyTorch picks is not always the fastest at this shape
    compiled + graph             efddpm.app.fast.compiled (what --compile does), then captured
    compiled (1x1 conv as mm) + graph
                                 the same with inductor's conv_1x1_as_mm: the 1x1 convolutions (the transformers'
                                 proj_in / proj_out, the resnets' shortcuts) as matrix multiplies, which it may fuse
                                 with their neighbours (on an H100: 6.69 ms against 6.66, no gain)
    compiled (max-autotune-no-cudagraphs) + graph
                                 inductor's autotuned kernels, then captured (slow to compile: unfinished after ~7
                                 minutes on an H100, so give this script a long limit)

With --profile, first where the eager step's GPU time goes: kernel time per step by kind (convolution, matrix
multiply, attention, normalisation, elementwise, copies), from torch.profiler, and the ten longest kernels.

Prints milliseconds per step (median of 50 after warm-up) and each lever's ratio to the eager + graph step, and
the output's largest difference from the eager one (fp16 rounding only). A lever that fails says why and the rest
go on. Compiling takes minutes:

    python benchmarks/step_levers.py --json levers.json          # on a GPU
    python benchmarks/step_levers.py --no-compile                # the eager levers only (~30 s)
    python benchmarks/step_levers.py --no-compile --profile      # and the eager step's kernel time by kind
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


KINDS = (("attention", ("fmha", "flash", "attention", "softmax")),              # first match wins
         ("layout and copies", ("nchwtonhwc", "nhwctonchw", "copy", "cat_", "catarray", "transpose")),
         ("convolution", ("conv", "fprop", "implicit", "cudnn")), ("matrix multiply", ("gemm", "nvjet", "cublas")),
         ("normalisation", ("norm", "welford")), ("elementwise", ("elementwise", "vectorized", "reduce")))


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, words in KINDS if any(word in name for word in words)), "other")


def profile(unet, x, t, context, steps: int = 5) -> dict:
    """GPU kernel time per eager step, by kind, and the ten longest kernels (ms per step)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch.inference_mode():
        for _ in range(3):
            unet(x, t, context)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                unet(x, t, context)
            torch.cuda.synchronize()
    by_kind, by_kernel, launches = {}, {}, 0
    for event in prof.key_averages():
        ms = event.device_time_total / 1e3 / steps
        if ms <= 0:
            continue
        launches += event.count / steps
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + ms
        by_kernel[event.key[:90]] = ms
    top = dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10])
    return {"kernel_ms_per_step_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernel_ms_per_step": round(sum(by_kind.values()), 3), "kernels_per_step": round(launches),
            "longest_kernels_ms_per_step": {k: round(v, 3) for k, v in top.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled levers")
    parser.add_argument("--profile", action="store_true", help="first, the eager step's kernel time by kind")
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
    if args.profile:
        res["eager_profile"] = profile(unet, x, t, context)
        print(json.dumps(res["eager_profile"]), flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    levers = {"eager": lambda: unet, "eager_graph": lambda: GraphedUNet(unet)}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        levers[f"eager_graph_sdpa_{name}"] = (lambda b: lambda: (b, GraphedUNet(unet)))(backend)
    if not args.no_compile:
        levers["compiled_graph"] = lambda: GraphedUNet(compiled(unet))
        levers["compiled_conv_1x1_as_mm_graph"] = lambda: GraphedUNet(
            torch.compile(unet, dynamic=False, options={"conv_1x1_as_mm": True}))
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
    if args.profile:                                                  # the step's cost against its batch
        with torch.inference_mode():
            graphed, res["eager_graph_ms_by_batch"] = GraphedUNet(unet), {}
            for b in (2, 4, 8, 16, 32):
                xb = x[:1].expand(b, -1, -1, -1).contiguous(memory_format=torch.channels_last)   # [b, 4, 64, 64]
                step = lambda: graphed(xb, t[:1].expand(b), context[:1].expand(b, -1, -1))
                res["eager_graph_ms_by_batch"][b] = round(milliseconds(step, 20), 3)
        print(json.dumps(res["eager_graph_ms_by_batch"]), flush=True)
    base = res.get("eager_graph_ms")
    for name in levers:
        if base and f"{name}_ms" in res:
            res[f"{name}_vs_eager_graph"] = round(base / res[f"{name}_ms"], 3)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
