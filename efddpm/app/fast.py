"""The CUDA fast path, in one module: the same mathematics with fewer kernel launches and fuller batches.

At batch 2 an SD1.x UNet step is bound by the host launching ~1,000 kernels, not by the GPU. So:

- the inversion skips the steps the edit never uses (efddpm.method.inversion.extract_noise's `skip`) and, in half
  precision, evaluates many timesteps in one batched call (extract_noise_batched; Algorithm 1 draws every x_t
  independently, so the steps depend on each other only through the write-back, whose change is rounding);
- the sequential steps replay a CUDA graph of the UNet, captured once per input shape (GraphedUNet);
- the UNet runs in channels_last memory format (cuDNN's faster NHWC convolutions; 12% on the whole edit;
  Editor.from_pretrained sets it);
- float32 networks on CUDA run without TF32 (exact_float32), so the float32 reconstruction stays exact;
- while Editor.from_pretrained reads the weights, a thread makes the GPU libraries' first calls (LibraryWarmUp).

Attention control (Prompt-to-Prompt, efddpm.nets.attention_control) keeps channels_last but neither the graphs nor
torch.compile: while a controller is set GraphedUNet runs the original, uncompiled UNet eagerly (a graph would never
consult the controller, and compiled frames cut by the controller's graph breaks cost more than they save).

Nothing here changes a formula; tests/test_fast_path.py checks the batched inversion against the literal
Algorithm 1 on the CPU, benchmarks/speed.py measures it on a GPU.
"""
import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efddpm.method.defaults import ETA
from efddpm.method.network import NoisePredictor, guided_eps, rows
from efddpm.method.scheduler import SD1, ScheduleConfig, alphas_cumprod, ddpm_step, mu, step_coefficients

SATURATING_BATCH = 32  # samples per UNet call; an H100 gains nothing beyond (SD1.x fp16: 3.3 ms/sample at 32, 3.2 at 64)


def inversion_chunk(latent: torch.Tensor, steps: int, per_step: int, dtype: torch.dtype) -> int:
    """Timesteps per batched inversion call: as many as keep the batch under SATURATING_BATCH samples. latent:
    [B, C, h, w]; per_step: UNet samples per step (2B with guidance). Float32 and float64 keep 1, the step-by-step
    Algorithm 1: batching makes f see x_t before the write-back, which costs the exact reconstruction (~1e-5
    instead of ~1e-8 in float32).

    The chunk decides the batch composition, and in half precision the batch composition decides the output bits,
    so it depends on the shapes and the dtype only, never on the free memory: same seed, same bytes, whatever else
    runs on the GPU. (Editor.invert falls back to chunk 1 if it does not fit, and records the chunk used.)"""
    if latent.device.type != "cuda" or dtype.itemsize > 2:
        return 1
    return max(1, min(steps, SATURATING_BATCH // per_step))


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


def compiled(unet: nn.Module) -> nn.Module:
    """torch.compile(unet, dynamic=False): one static graph per input shape (the inversion's batch and the
    regeneration's), which GraphedUNet then captures in CUDA graphs. Not fullgraph: the plain UNet traces whole (no
    graph break), and with an attention controller set (Prompt-to-Prompt) the graph breaks around the controller's
    calls (efddpm.nets.unet keeps them out of graphs), which fullgraph would refuse. GraphedUNet does not call it
    with a controller set, though: cut into dozens of guarded frames it was slower than eager (the reference P2P edit
    on an H100 80GB, fp16, one run: 3.46 s compiled, 2.38 s eager, same process).

    PyTorch's persistent caches (FX graph, AOTAutograd, Triton kernels) go to TORCHINDUCTOR_CACHE_DIR, by default
    ~/.cache/efddpm/torchinductor (not /tmp, which is cleared): the first process on a machine compiles (72.5 and
    113.5 s of warm-up on two H100s for SD1.x), later ones trace the model again but read the compiled kernels
    (14.1 and 17.1 s)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "efddpm" / "torchinductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return torch.compile(unet, dynamic=False)


class LibraryWarmUp(threading.Thread):
    """One small call of each GPU library the networks use (cuBLAS, cuDNN's convolutions in channels_last, the
    attention kernels, the norms), in a thread: their one-off start-up (loading, handles; 0.27 s on an H100) then
    overlaps with reading the weights and building the networks instead of delaying the first edit.
    Editor.from_pretrained starts one before loading and joins it after; an error in the thread is raised by join().

    It cannot do more: cuDNN's per-shape plans (convolutions, attention), most of a first edit's extra host time,
    are cached per thread by PyTorch, so the networks' real shapes must be met in the thread that runs them."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(name="efddpm-library-warm-up", daemon=True)
        self.device, self.dtype, self.error = device, dtype, None
        self.start()

    @torch.inference_mode()
    def run(self) -> None:
        try:
            like = dict(device=self.device, dtype=self.dtype)
            x = torch.zeros(2, 64, 16, 16, **like).to(memory_format=torch.channels_last)     # [B, C, h, w]
            conv3, conv1 = torch.zeros(64, 64, 3, 3, **like), torch.zeros(32, 64, 1, 1, **like)
            F.conv2d(F.silu(F.group_norm(x, 32)), conv3.to(memory_format=torch.channels_last), padding=1)
            F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv1.to(memory_format=torch.channels_last))
            tokens = torch.zeros(2, 77, 64, **like)                                          # [B, N, width]
            F.gelu(F.linear(F.layer_norm(tokens, (64,)), torch.zeros(64, 64, **like)))
            heads = tokens.view(2, 77, 8, 8).transpose(1, 2)                                 # [B, heads, N, d]
            F.scaled_dot_product_attention(heads, heads, heads)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as error:                                  # raised again by join
            self.error = error

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


class GraphedUNet:
    """unet(x, t, context) replayed from a CUDA graph, one graph per input shape (captured on first use).

    Inputs are copied into the graph's static buffers and the output is cloned, so callers see an
    ordinary function. Use under torch.inference_mode(), as efddpm.app.editor does.

    While the UNet has an attention controller (UNet.controlled: Prompt-to-Prompt), the original module runs eagerly
    instead (uncompiled, if the UNet is torch.compile'd: see compiled): a graph replays the kernels it captured and
    would never consult the controller."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if getattr(self.unet, "attention_control", None) is not None:
            return getattr(self.unet, "_orig_mod", self.unet)(x, t, context)      # eager, uncompiled
        key = (tuple(x.shape), tuple(context.shape), x.dtype, context.dtype)
        if key not in self.graphs:
            self.graphs[key] = self.capture(x, t, context)
        graph, inputs, output = self.graphs[key]
        for static, value in zip(inputs, (x, t, context)):
            static.copy_(value)
        graph.replay()
        return output.clone()

    def capture(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        inputs = (x.clone(), t.clone(), context.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation, kernel selection
            for _ in range(2):
                self.unet(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.unet(*inputs)
        return graph, inputs, output


def extract_noise_batched(f: NoisePredictor, xts: Tensor, ts: Tensor, cond=None, uncond=None, guidance=None, *,
                          chunk: int, eta: float = ETA, schedule: ScheduleConfig = SD1,
                          reference_direction: bool = False, skip: int = 0) -> Tensor:
    """efddpm.method.inversion.extract_noise with f evaluated for `chunk` consecutive steps in ONE batched call
    (batch chunk * B, or twice that with guidance). The x_t of an edit-friendly trajectory are all drawn before
    the extraction, so the steps depend on each other only through the write-back of eq. 3, whose change is
    rounding: here f and mu see x_t as stored before the write-back. chunk = 1 is the literal Algorithm 1.
    Modifies xts [N+1, B, ...] in place; returns zs [N, B, ...] (NaN for the `skip` noisiest steps)."""
    zs = torch.full_like(xts[1:], float("nan"))                             # [N, B, ...]
    for _ in extraction_chunks(f, xts, zs, ts, cond, uncond, guidance, chunk=chunk, eta=eta, schedule=schedule,
                               reference_direction=reference_direction, skip=skip):
        pass
    return zs


def extraction_chunks(f: NoisePredictor, xts: Tensor, zs: Tensor, ts: Tensor, cond=None, uncond=None, guidance=None,
                      *, chunk: int, eta: float = ETA, schedule: ScheduleConfig = SD1,
                      reference_direction: bool = False, skip: int = 0) -> Iterator[list[int]]:
    """extract_noise_batched one chunk at a time: each step of the generator makes one batched call of f, writes
    z_t into zs[t-1] (eq. 5) and x_{t-1} into xts[t-1] (eq. 3) for the chunk's t, noisiest first, and yields those
    t. Nothing here waits for the GPU (no copy from the host, no reading of a value), so the host can queue every
    chunk on one CUDA stream while another stream regenerates (efddpm.app.overlap)."""
    abar, n_steps, batch = alphas_cumprod(schedule), ts.numel(), xts.shape[1]
    if not 0 <= skip < n_steps or chunk < 1:
        raise ValueError(f"need 0 <= skip < {n_steps} and chunk >= 1, got skip={skip}, chunk={chunk}")
    t_rows = ts.to(xts.device, non_blocking=True).repeat_interleave(batch).view(n_steps, batch)  # [N, B], ts[N-t]: t
    ts = ts.tolist()                                                        # read once
    steps = list(range(n_steps - skip, 0, -1))                              # the paper's t = T - skip .. 1
    for first in range(0, len(steps), chunk):
        group = steps[first:first + chunk]                                  # the paper's t, descending
        coefs = [step_coefficients(abar, ts[n_steps - n], n_steps, schedule, eta, reference_direction)
                 for n in group]
        if min(s.sigma for s in coefs) <= 0:
            raise ValueError("sigma_t = 0: eq. 5 needs eta > 0 and var_t > 0")
        x_in = xts[group[-1]:group[0] + 1].flip(0)                          # x_t (a copy), [C, B, ...]
        t_in = t_rows[n_steps - group[0]:n_steps - group[-1] + 1].flatten()  # [C * B]
        eps = guided_eps(f, x_in.flatten(0, 1), t_in,                       # f_t(x_t), [C * B, ...]
                         tiled(cond, len(group), batch), tiled(uncond, len(group), batch),
                         tiled(guidance, len(group), batch)).view_as(x_in)
        for x, e, n, s in zip(x_in, eps, group, coefs):
            zs[n - 1] = (xts[n - 1] - mu(x, e, s)) / s.sigma                # eq. 5
            xts[n - 1] = ddpm_step(x, e, s, zs[n - 1])                      # eq. 3 (write-back)
        yield group


def tiled(c, times: int, batch: int):
    """A per-sample tensor (batch `batch` or 1) repeated for `times` steps stacked in one batch; numbers and None
    pass through."""
    if not isinstance(c, Tensor) or c.dim() == 0:
        return c
    c = rows(c, batch)
    return c.repeat(times, *([1] * (c.dim() - 1)))                          # [times * batch, ...]
