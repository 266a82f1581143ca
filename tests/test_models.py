"""The SD1.x networks: layout of the real checkpoint, parity with diffusers/transformers, dtypes, training.

Parity goes through diffusers' OWN converter from the original (LDM) layout to its layout, so it checks
our module names and our arithmetic without using any renaming code of ours.
Tolerance (fp32, CPU): relative L2 error ||ours - ref|| / ||ref|| <= 1e-5.
"""
import pytest
import torch

from efddpm.nets.clip import CLIPTextConfig, CLIPTextModel
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.nets.vae import AutoencoderKL, VAEConfig

from models_util import (SMALL_CLIP, SMALL_UNET, SMALL_VAE, UNET_WITHOUT_TOP_ATTENTION, diffusers_unet_config,
                         diffusers_vae_config, fixture_shapes, randomize_, rel_err, transformers_clip_config)

REL_TOL = 1e-5


def shapes_of(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- layout of the real SD1.x checkpoint

@pytest.mark.parametrize("build, fixture, n_params", [
    (UNet, "UNET-v1-SD.txt", 859_520_964),
    (AutoencoderKL, "VAE-v1-SD.txt", 83_653_863),
    (CLIPTextModel, "CLIP-v1-SD.txt", 123_060_480),
])
def test_sd1_preset_matches_real_checkpoint_layout(build, fixture, n_params):
    with torch.device("meta"):
        model = build()
    expected = fixture_shapes(fixture)
    expected.pop("embeddings.position_ids", None)  # rebuilt in forward, never loaded (see efddpm/nets/clip.py)
    assert shapes_of(model) == expected
    assert sum(p.numel() for p in model.parameters()) == n_params


# ---------------------------------------------------------------- reference twins on identical weights

def diffusers_unet_twin(ours: UNet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_unet_config(ours.config))
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, ref.config), strict=True, assign=True)
    return ref.eval()


def diffusers_vae_twin(ours: AutoencoderKL):
    from diffusers import AutoencoderKL as Reference
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    with torch.device("meta"):
        ref = Reference(**diffusers_vae_config(ours.config))
    ldm = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, ref.config), strict=True, assign=True)
    return ref.eval()


def transformers_clip_twin(ours: CLIPTextModel):
    from transformers import CLIPTextModel as Reference
    ref = Reference(transformers_clip_config(ours.config))  # not on meta: its position_ids buffer must be real
    prefix = "text_model." if hasattr(ref, "text_model") else ""  # transformers < 5 wraps the tower
    state = {prefix + k: v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return ref.eval()


def check_unet(config: UNetConfig, latent: int, seed: int):
    pytest.importorskip("diffusers")  # the reference
    ours = randomize_(UNet(config).eval(), seed)
    ref = diffusers_unet_twin(ours)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, latent, latent, generator=gen)
    t = torch.tensor([1, 981])
    context = torch.randn(2, 77, config.context_dim, generator=gen)
    with torch.no_grad():
        assert rel_err(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample) <= REL_TOL


def check_vae(config: VAEConfig, size: int, seed: int):
    pytest.importorskip("diffusers")
    ours = randomize_(AutoencoderKL(config).eval(), seed)
    ref = diffusers_vae_twin(ours)
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    f = 2 ** (len(config.channel_mult) - 1)
    z = torch.randn(1, config.latent_channels, size // f, size // f, generator=gen)
    with torch.no_grad():
        ours_post, ref_post = ours.encode(image), ref.encode(image).latent_dist
        assert rel_err(ours_post.mode(), ref_post.mode()) <= REL_TOL
        assert rel_err(ours_post.std, ref_post.std) <= REL_TOL
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= REL_TOL


def check_clip(config: CLIPTextConfig, seed: int):
    pytest.importorskip("transformers")
    ours = randomize_(CLIPTextModel(config).eval(), seed)
    ref = transformers_clip_twin(ours)
    ids = torch.randint(0, config.vocab_size, (2, config.context_length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).last_hidden_state) <= REL_TOL


def test_unet_parity_small():
    check_unet(SMALL_UNET, latent=16, seed=0)


def test_unet_parity_small_no_attention_at_top_level():
    check_unet(UNET_WITHOUT_TOP_ATTENTION, latent=8, seed=1)


def test_vae_parity_small():
    check_vae(SMALL_VAE, size=32, seed=0)


def test_clip_parity_small():
    check_clip(SMALL_CLIP, seed=0)


def test_full_size_sd1_parity():
    """One forward of each full SD1.x network against its reference (UNet at a 16x16 latent to stay cheap)."""
    check_clip(CLIPTextConfig(), seed=3)
    check_vae(VAEConfig(), size=64, seed=4)
    check_unet(UNetConfig(), latent=16, seed=5)


# ---------------------------------------------------------------- dtypes, posterior, compile, training

def test_float64_agrees_with_float32():
    torch.manual_seed(0)
    unet = randomize_(UNet(SMALL_UNET).eval(), 0)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 24)
    with torch.no_grad():
        out32 = unet(x, t, c)
        out64 = unet.double()(x.double(), t, c.double())
    assert out64.dtype == torch.float64
    assert rel_err(out32, out64) <= REL_TOL


def test_posterior_mode_and_seeded_sample():
    vae = randomize_(AutoencoderKL(SMALL_VAE).eval(), 0)
    with torch.no_grad():
        post = vae.encode(torch.rand(4, 3, 32, 32) * 2 - 1)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(post.mode(), post.mean)
    standardized = (a - post.mean) / post.std  # must be N(0, 1): 4*4*16*16 = 4096 draws
    assert abs(standardized.mean().item()) < 0.1 and abs(standardized.std().item() - 1) < 0.1


@pytest.mark.parametrize("name", ["unet", "vae", "clip"])
def test_traces_with_fullgraph_compile(name):
    """torch.compile(fullgraph=True) raises on any graph break; the eager backend keeps this test fast on CPU."""
    torch._dynamo.reset()
    if name == "unet":
        model, args = UNet(SMALL_UNET).eval(), (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 24))
    elif name == "vae":
        vae = AutoencoderKL(SMALL_VAE).eval()
        model, args = (lambda x: vae.decode(vae.encode(x).mode())), (torch.randn(1, 3, 32, 32),)
    else:
        model, args = CLIPTextModel(SMALL_CLIP).eval(), (torch.randint(0, 1000, (1, 77)),)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(*args), model(*args))


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    unet, vae, clip = UNet(SMALL_UNET), AutoencoderKL(SMALL_VAE), CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, width=24, layers=2, heads=2, mlp_width=48))
    models = torch.nn.ModuleList([unet, vae, clip]).train()
    before = [p.detach().clone() for p in models.parameters()]
    optimizer = torch.optim.AdamW(models.parameters(), lr=1e-3)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, posterior = vae(image, torch.Generator().manual_seed(0))
    context = clip(torch.randint(0, 1000, (2, 77)))
    noise = torch.randn(2, 4, 16, 16)
    eps = unet(posterior.sample() + noise, torch.tensor([3, 700]), context)
    loss = (recon - image).pow(2).mean() + (eps - noise).pow(2).mean()
    loss.backward()
    without_grad = [n for n, p in models.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, models.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = randomize_(UNet(SMALL_UNET).train(), 0)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 24)
    grads = []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(x, t, c).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert rel_err(grads[1], grads[0]) <= REL_TOL
