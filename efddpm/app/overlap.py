"""One edit's inversion and regeneration overlapped on two CUDA streams: what Editor.invert_and_edit runs on the fast
path.

Regeneration step t reads one thing the inversion makes: z_t (its start, x_{T-skip}, is drawn by eq. 6 before any
extraction, and the write-back of eq. 3 never touches it). The batched inversion (efddpm.app.fast.extraction_chunks)
writes the z's noisiest first, a chunk of timesteps per UNet call. So the regeneration need not wait for the whole
inversion: here the inversion's chunks run on a side stream, and step t makes the regeneration's stream wait, on the
GPU and not on the host, for the event recorded after the chunk that wrote z_t. The host queues a chunk when a step
first asks for a z it does not have, one chunk ahead, so the side stream always has the next chunk queued and the
GPU fills the regeneration's idle SMs (batch 2, ~10% of an H100) with the inversion's batch-32 work.

Same formulas, same batches (the chunk is the same as without the overlap), so the same bits: only the order in
which independent kernels run changes. On the CPU there is no side stream and the chunks run in the host's order,
interleaved with the steps as on a GPU (tests/test_overlap.py checks that order and the bits there).
"""
import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from efddpm.app.fast import extraction_chunks


class PendingNoise:
    """The noise maps of an inversion computed when a regeneration step first needs them.

    extract: an efddpm.method.inversion.Extract that computes nothing: it returns zs (NaN) and keeps the chunks to
    compute. wait(t): regenerate's noise_ready hook. finish(): computes what is left and joins the streams."""

    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream, self.chunk = stream, 0
        self.chunks: Iterator[list[int]] | None = None                  # None: extract was never called
        self.ready: dict[int, torch.cuda.Event | None] = {}    # the paper's t -> the event after its chunk

    def extract(self, f, xts: Tensor, ts: Tensor, cond=None, uncond=None, guidance=None, *, chunk: int,
                **options) -> Tensor:
        """extract_noise_batched's arguments; returns zs [N, B, ...], NaN until the chunks fill it."""
        zs = torch.full_like(xts[1:], float("nan"))                          # [N, B, ...]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())             # x_0, the x_t and the prompts first
        self.chunk = chunk
        self.chunks = extraction_chunks(f, xts, zs, ts, cond, uncond, guidance, chunk=chunk, **options)
        return zs

    def pull(self) -> bool:
        """Queue the next chunk (on the side stream); False when none is left."""
        if self.chunks is None:
            return False
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            group = next(self.chunks, None)
            if group is None:
                return False
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.ready.update(dict.fromkeys(group, event))
        return True

    def wait(self, t: int) -> None:
        """Before regeneration step t reads z_t: the chunks up to the one that writes z_{t - chunk} are queued (one
        ahead), and the current stream waits for the one that wrote z_t."""
        while max(1, t - self.chunk) not in self.ready and self.pull():
            pass
        if t not in self.ready:
            raise RuntimeError(f"z_{t} is not among the noise maps this inversion computes")
        if self.ready[t] is not None:
            torch.cuda.current_stream().wait_event(self.ready[t])

    def regenerating(self, run: Callable[..., Tensor]) -> Tensor:
        """run(noise_ready=self.wait) -> x_0, then finish(). On CUDA it runs on a stream of the highest priority:
        whenever SMs free up, the GPU schedules the regeneration's waiting blocks before the inversion's (the
        regeneration is the critical path). Without priorities the two barely overlapped on an H100 (1.102 s a
        reference edit against 1.124 s one after the other), the regeneration's small kernels presumably queued
        behind the inversion's large ones; with them, on another H100, no better (1.150 s against 1.177 s)."""
        if self.stream is None:
            out = run(noise_ready=self.wait)
            self.finish()
            return out
        caller = torch.cuda.current_stream()
        urgent = torch.cuda.Stream(caller.device, priority=-100)          # clamped to the device's highest
        urgent.wait_stream(caller)                                          # the code and the prompts first
        with torch.cuda.stream(urgent):
            out = run(noise_ready=self.wait)
            self.finish()
        caller.wait_stream(urgent)
        out.record_stream(caller)                                           # made on `urgent`, used on the caller's
        return out

    def finish(self) -> None:
        """Compute the chunks no step asked for; from here on the current stream sees every z (and every tensor the
        side stream read may be freed)."""
        while self.pull():
            pass
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
