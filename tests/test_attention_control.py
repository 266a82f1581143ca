"""The UNet's attention-control API (efddpm.nets.attention_control): every layer knows its site; without a
controller the fused attention runs alone, bit for bit as before; a controller gets the real probabilities only
where it asks, and what it returns is what the layer uses; channels_last, torch.compile and float64 keep working,
and the fast path's CUDA graphs step aside while a controller is set."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import efddpm.nets.unet as unet_module
from efddpm.app.fast import GraphedUNet
from efddpm.app.prompt_to_prompt import blend_level
from efddpm.nets.attention_control import AttentionControl, attention_probabilities
from efddpm.nets.unet import CrossAttention, UNet, UNetConfig

from inversion_util import one_thread  # noqa: F401  (autouse fixture)
from models_util import METHOD_UNET, SMALL_UNET, randomize_


@pytest.fixture(scope="module")
def net():
    """SMALL_UNET (levels 0-2, attention at 0 and 1) in float64, and one input: latents 16x16, 8 text tokens."""
    unet = randomize_(UNet(SMALL_UNET), 0).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    context = torch.randn(2, 8, SMALL_UNET.context_dim, generator=g, dtype=torch.float64)
    return unet, (x, torch.tensor([500, 20]), context)


class Recorder(AttentionControl):
    """Wants every layer (or those `want` accepts), records what it saw, returns `replace(site, probs)`."""

    def __init__(self, want=lambda site, queries, keys: True, replace=lambda site, probs: probs):
        self.want, self.replace, self.asked, self.seen = want, replace, [], []

    def wants(self, site, queries, keys):
        self.asked.append((site, queries, keys))
        return self.want(site, queries, keys)

    def __call__(self, site, probs):
        self.seen.append((site, probs))
        return self.replace(site, probs)


def hook_free_forward(self, x, context=None):
    """CrossAttention.forward as it was before the control API: the fused attention, nothing else."""
    context = x if context is None else context
    B, N, C = x.shape
    q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
    k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
    v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
    return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def never(*args):
    raise AssertionError("attention probabilities were formed")


# ------------------------------------------------------------------------------------------ sites

def test_every_layer_knows_its_site_in_call_order(net):
    unet, inputs = net
    sites = unet.attention_sites
    cross = [(s.place, s.level) for s in sites if s.cross]
    assert cross == [("down", 0), ("down", 0), ("down", 1), ("down", 1), ("mid", 2),
                     ("up", 1), ("up", 1), ("up", 1), ("up", 0), ("up", 0), ("up", 0)]
    assert [(s.place, s.level) for s in sites if not s.cross] == cross          # a self- and a cross-layer each
    assert [s.index for s in sites if s.cross] == list(range(11)) == [s.index for s in sites if not s.cross]
    recorder = Recorder()
    with torch.no_grad(), unet.controlled(recorder):
        unet(*inputs)
    assert [site for site, _ in recorder.seen] == sites                        # the order the layers run in
    assert {(s.cross, q, k) for s, q, k in recorder.asked} >= {(True, 256, 8), (False, 256, 256), (False, 16, 16)}


def test_sd1_sites_and_the_reference_blend_layers():
    """SD1.x: 16 self- and 16 cross-attention layers. The reference LocalBlend takes down_cross[2:4] + up_cross[:3]
    of the layers it stores (those with at most 32x32 queries) at 512 pixels: exactly the layers of level 2, which
    blend_level picks."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    cross = [s for s in unet.attention_sites if s.cross]
    assert len(cross) == 16 and len(unet.attention_sites) == 32
    assert [s.level for s in cross] == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    stored = lambda place: [s for s in cross if s.place == place and (64 >> s.level) ** 2 <= 32 ** 2]
    reference = stored("down")[2:4] + stored("up")[:3]
    level = blend_level(unet)
    assert level == 2 and reference == [s for s in cross if s.place != "mid" and s.level == level]


# ------------------------------------------------------------------------------------------ no cost when unused

def test_without_a_controller_the_fused_attention_runs_alone(net, monkeypatch):
    """Bit for bit what the hook-free layer computes, and no probabilities formed."""
    unet, inputs = net
    with torch.no_grad():
        out = unet(*inputs)
        monkeypatch.setattr(unet_module, "attention_probabilities", never)
        assert torch.equal(unet(*inputs), out)
        monkeypatch.setattr(CrossAttention, "forward", hook_free_forward)
        assert torch.equal(unet(*inputs), out)


def test_a_controller_that_wants_nothing_changes_no_bit(net, monkeypatch):
    unet, inputs = net
    with torch.no_grad():
        plain = unet(*inputs)
        monkeypatch.setattr(unet_module, "attention_probabilities", never)
        recorder = Recorder(want=lambda *a: False)
        with unet.controlled(recorder):
            assert torch.equal(unet(*inputs), plain)
    assert len(recorder.asked) == len(unet.attention_sites) and recorder.seen == []


# ------------------------------------------------------------------------------------------ observe, replace

def test_the_controller_gets_the_real_probabilities(net):
    """softmax(q k^T / sqrt(d)) of the layer's own input, per head; using them as they are changes the output by
    rounding only."""
    unet, inputs = net
    layer = unet.attention_layers[3]                                         # a cross-attention layer of level 0
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.update(args=args))
    recorder = Recorder(want=lambda site, q, k: site == layer.site)
    with torch.no_grad(), unet.controlled(recorder):
        out = unet(*inputs)
    handle.remove()
    (site, probs), = recorder.seen
    x, context = captured["args"]
    heads = layer.heads
    q = layer.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)             # [B, heads, N, d]
    k = layer.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)       # [B, heads, M, d]
    expected = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    assert site.cross and probs.shape == (2, heads, 256, 8) and probs.dtype == torch.float64
    assert torch.allclose(probs, expected, rtol=0, atol=1e-14)
    with torch.no_grad():
        assert (out - unet(*inputs)).abs().max() < 1e-12


def test_what_the_controller_returns_is_what_the_layer_uses(net):
    """Uniform cross-attention: each pixel gets the mean of the values; the layer then ignores its queries."""
    unet, inputs = net
    layer = CrossAttention(16, 8, 2).double()
    layer.site = unet.attention_sites[1]
    layer.control = Recorder(replace=lambda site, p: torch.full_like(p, 1 / p.shape[-1]))
    x, context = torch.randn(3, 10, 16, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    v = layer.to_v(context).mean(1, keepdim=True)                            # [B, 1, 16]: per head, the mean value
    assert torch.allclose(layer(x, context), layer.to_out(v).expand(3, 10, 16), atol=1e-14)
    with torch.no_grad(), unet.controlled(Recorder(replace=lambda s, p: p.flip(-1) if s.cross else p)):
        changed = unet(*inputs)
    assert (changed - unet(*inputs)).abs().max() > 1e-3


def test_probabilities_of_half_precision_are_formed_in_float32():
    q, k = torch.randn(1, 2, 4, 8).half() * 300, torch.randn(1, 2, 5, 8).half() * 300   # scores overflow fp16
    probs = attention_probabilities(q, k)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()


# ------------------------------------------------------------------------------------------ the controller's life

def test_the_controller_is_removed_on_the_way_out(net):
    unet, inputs = net
    with pytest.raises(ZeroDivisionError):
        with unet.controlled(Recorder()):
            1 / 0
    assert unet.attention_control is None and all(layer.control is None for layer in unet.attention_layers)
    with unet.controlled(Recorder()):
        with pytest.raises(RuntimeError, match="already has an attention controller"):
            with unet.controlled(Recorder()):
                pass
    with pytest.raises(TypeError, match="must not be an nn.Module"):
        with unet.controlled(torch.nn.Identity()):
            pass
    assert set(unet.state_dict()) == set(UNet(SMALL_UNET).state_dict())


# ------------------------------------------------------------------------------------------ the fast path

def test_channels_last_and_compile_with_a_controller(net):
    """The fast path's memory format and torch.compile (the eager backend, to stay quick on the CPU) give what the
    plain UNet gives under the same controller."""
    unet, inputs = net
    flip = lambda: Recorder(want=lambda s, q, k: s.cross or k <= 64, replace=lambda s, p: p.flip(-1))
    with torch.no_grad():
        with unet.controlled(flip()):
            expected = unet(*inputs)
        fast = randomize_(UNet(SMALL_UNET), 0).double().eval().to(memory_format=torch.channels_last)
        with fast.controlled(flip()):
            assert (fast(*inputs) - expected).abs().max() < 1e-12
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend="eager")
        with unet.controlled(flip()) as recorder:
            assert (compiled(*inputs) - expected).abs().max() < 1e-12
        assert len(recorder.seen) == sum(s.cross or s.level > 0 for s in unet.attention_sites)
        assert torch.equal(compiled(*inputs), unet(*inputs))                   # and without it, fused again


class Stepping(Recorder):
    """A controller with a step counter, as Prompt-to-Prompt's: what it wants changes with the step."""

    def __init__(self):
        super().__init__(want=lambda s, q, k: self.step % 2 == 0 and s.cross)
        self.step = 0


def test_a_compiled_unet_does_not_recompile_as_its_controller_steps(net):
    """The controller is consulted outside torch.compile's graphs (efddpm.nets.unet.keep_out_of_graphs): its step
    counter is no guard, so the graphs compiled for the first steps serve every later step (with the counter
    traced, each step would compile new ones, until dynamo's recompile limit)."""
    from torch._dynamo.testing import CompileCounter
    unet, inputs = net
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(unet, backend=counter)
    control = Stepping()
    with torch.no_grad(), unet.controlled(control):
        outs = []
        for step in range(8):
            control.step = step
            outs.append(compiled(*inputs))
            if step == 1:
                after_two = counter.frame_count
    assert counter.frame_count == after_two > 0
    with torch.no_grad(), unet.controlled(Stepping()) as again:
        again.step = 3
        assert torch.equal(unet(*inputs), outs[3])
    torch._dynamo.reset()


def test_importing_efddpm_does_not_import_dynamo():
    """torch._dynamo takes about a second to import: a command pays it only when it compiles or sets a controller."""
    code = "import sys, efddpm, efddpm.__main__; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_graphed_unet_runs_eagerly_while_a_controller_is_set():
    """A CUDA graph replays the kernels it captured and would never consult the controller; on the CPU a capture
    would fail, so this passes only through the eager call."""
    unet = randomize_(UNet(METHOD_UNET), 0).double().eval()
    args = (torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 10]),
            torch.randn(2, 8, 32, dtype=torch.float64))
    recorder = Recorder(want=lambda s, q, k: s.cross)
    with torch.no_grad(), unet.controlled(recorder):
        out = GraphedUNet(unet)(*args)
        assert torch.equal(out, unet(*args))
    assert len(recorder.seen) == 2 * 4


def test_graphed_unet_runs_a_compiled_unet_uncompiled_while_a_controller_is_set():
    """With a controller the graph breaks cut a compiled UNet into dozens of frames, each guarded and resumed, which
    costs more than it saves (the reference P2P edit on an H100: 3.46 s compiled, 2.38 s eager, same process): the
    fast path runs the original module then, so nothing is compiled while a controller is set."""
    from torch._dynamo.testing import CompileCounter
    unet = randomize_(UNet(METHOD_UNET), 0).double().eval()
    args = (torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 10]),
            torch.randn(2, 8, 32, dtype=torch.float64))
    torch._dynamo.reset()
    counter = CompileCounter()
    graphed = GraphedUNet(torch.compile(unet, backend=counter, dynamic=False))
    with torch.no_grad(), unet.controlled(Recorder(want=lambda s, q, k: s.cross)):
        assert torch.equal(graphed(*args), unet(*args))
    assert counter.frame_count == 0
    torch._dynamo.reset()
