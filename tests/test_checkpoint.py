"""Checkpoint loading: renaming rules against the real SD1 file layout, round trips through every source
kind (diffusers folder, fp16 variant, single .safetensors / .ckpt, full file with EMA, hub cache), and
one test per refusal. Models are tiny; full SD1 size only on the meta device."""
import json
import shutil
import sys
import types

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import efddpm.checkpoint as ckpt
from efddpm.checkpoint import CheckpointError, load, save_single_file
from efddpm.nets.clip import CLIPTextConfig, CLIPTextModel
from efddpm.nets.unet import UNet, UNetConfig
from efddpm.method.scheduler import diffusers_config
from efddpm.nets.vae import AutoencoderKL, VAEConfig

from models_util import (SD1_LIKE_CLIP, SD1_LIKE_UNET, SD1_LIKE_VAE, SMALL_UNET, SMALL_VAE, diffusers_unet_config,
                         diffusers_vae_config, fixture_shapes, randomize_, rel_err, transformers_clip_config,
                         write_tokenizer_folder)

# Tiny models whose non-inferable settings (heads, norm groups) are SD1.x's (SD1_LIKE_*), so that files without
# metadata load into the same configs; SD1.x's scheduler as a diffusers folder has it.

SD1_SCHEDULER = {"_class_name": "PNDMScheduler", **diffusers_config(), "skip_prk_steps": True}
REL_TOL = 1e-5


# The reference implementations, for the tests that need them (the others run without them).
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def single_file_tensors(unet, vae, text_encoder) -> dict:
    """The official single-file layout of three models (what save_single_file writes, without metadata)."""
    return ({ckpt.UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
            | {ckpt.VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
            | {ckpt.TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})


# ---------------------------------------------------------------- renaming rules vs the real SD1 file

def test_diffusers_unet_rules_give_the_sd1_file_layout(diffusers):
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.x
    config = ckpt.unet_config_from_diffusers(dict(unet.config))
    assert config == UNetConfig()
    mapped = {ckpt.diffusers_unet_name(k, config): list(v.shape) for k, v in unet.state_dict().items()}
    assert mapped == fixture_shapes("UNET-v1-SD.txt")


@pytest.mark.parametrize("old_attention_names", [False, True])
def test_diffusers_vae_rules_give_the_sd1_file_layout(old_attention_names, diffusers):
    levels = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(down_block_types=levels[0], up_block_types=levels[1],
                                      block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    config = ckpt.vae_config_from_diffusers(dict(vae.config))
    assert config == VAEConfig()
    tensors = vae.state_dict()
    if old_attention_names:  # diffusers < 0.15 wrote the VAE attention as query/key/value/proj_attn
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        tensors = {next((k.replace(f".{a}.", f".{b}.") for a, b in old.items() if f".{a}." in k), k): v
                   for k, v in tensors.items()}
    mapped = {}
    for key, t in tensors.items():
        name = ckpt.diffusers_vae_name(key, 4)
        mapped[name] = list(ckpt.conv_1x1(name, t).shape)
    assert mapped == fixture_shapes("VAE-v1-SD.txt")


def test_transformers_clip_rules_give_the_sd1_file_layout(transformers):
    config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        clip = transformers.CLIPTextModel(config)
    assert ckpt.clip_config_from_transformers(config.to_dict()) == CLIPTextConfig()
    expected = fixture_shapes("CLIP-v1-SD.txt")
    expected.pop("embeddings.position_ids")  # ignored: rebuilt in forward
    for prefix in ("", "text_model."):  # transformers >= 5 files / the hub's SD1 files
        mapped = {ckpt.transformers_clip_name(prefix + k): list(v.shape) for k, v in clip.state_dict().items()}
        assert mapped == expected


def test_ema_names_and_inferred_configs_match_the_sd1_file():
    with torch.device("meta"):
        names = list(UNet().state_dict())
    assert sorted(n.replace(".", "") for n in names) == sorted(fixture_shapes("UNET-v1-EMA.txt"))
    meta = lambda name: {k: torch.empty(s, device="meta") for k, s in fixture_shapes(name).items()}
    assert ckpt.infer_unet_config(meta("UNET-v1-SD.txt"), "f") == UNetConfig()
    assert ckpt.infer_vae_config(meta("VAE-v1-SD.txt"), "f") == VAEConfig()
    assert ckpt.infer_clip_config(meta("CLIP-v1-SD.txt"), "f") == CLIPTextConfig()


# ---------------------------------------------------------------- a genuine diffusers folder

@pytest.fixture(scope="module")
def hf_models(diffusers, transformers):
    """diffusers / transformers twins of the tiny configs, with random weights."""
    unet = randomize_(diffusers.UNet2DConditionModel(**diffusers_unet_config(SD1_LIKE_UNET)), seed=1)
    vae = randomize_(diffusers.AutoencoderKL(**diffusers_vae_config(SD1_LIKE_VAE)), seed=2)
    clip = randomize_(transformers.CLIPTextModel(transformers_clip_config(SD1_LIKE_CLIP)), seed=3)
    return unet.eval(), vae.eval(), clip.eval()


def write_diffusers_folder(folder, hf_models, variant=None, dtype=torch.float32):
    unet, vae, clip = hf_models
    for sub, model in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        model.to(dtype).save_pretrained(folder / sub, variant=variant)
        model.float()
    write_tokenizer_folder(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, hf_models):
    return write_diffusers_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", hf_models)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


def test_diffusers_folder_loads_with_its_configs(loaded, folder):
    assert (loaded.unet.config, loaded.vae.config, loaded.text_encoder.config) == (SD1_LIKE_UNET, SD1_LIKE_VAE, SD1_LIKE_CLIP)
    assert loaded.scheduler_config == SD1_SCHEDULER and loaded.alphas_cumprod is None
    assert loaded.source == str(folder)
    assert loaded.image_size == 64 * 2 ** (len(SD1_LIKE_VAE.channel_mult) - 1)  # no sample_size: diffusers' SD1 64
    assert loaded.tokenizer("a photo of a cat")[0, :3].tolist() == [49406, 320, 1125]
    assert not loaded.unet.training


@torch.no_grad()
def test_diffusers_folder_gives_the_diffusers_outputs(loaded, hf_models):
    unet, vae, clip = hf_models
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 48, generator=gen)
    t = torch.tensor([10, 500])
    assert rel_err(loaded.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample) < REL_TOL
    image, z = torch.randn(1, 3, 32, 32, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    assert rel_err(loaded.vae.encode(image).mean, vae.encode(image).latent_dist.mean) < REL_TOL
    assert rel_err(loaded.vae.decode(z), vae.decode(z).sample) < REL_TOL
    ids = torch.randint(0, 49408, (2, 77), generator=gen)
    assert rel_err(loaded.text_encoder(ids), clip(ids).last_hidden_state) < REL_TOL


# ---------------------------------------------------------------- a folder saved by diffusers itself

@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, hf_models, diffusers, transformers):
    """The tiny models saved by StableDiffusionPipeline.save_pretrained of the installed diffusers/transformers
    (with transformers >= 5: tokenizer/ holds tokenizer.json and tokenizer_config.json, no vocab.json)."""
    tmp = tmp_path_factory.mktemp("saved")
    unet, vae, clip = hf_models
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_tokenizer_folder(tmp / "tokenizer-source"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.PNDMScheduler.from_config(SD1_SCHEDULER),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd")
    return tmp / "sd"


@torch.no_grad()
def test_folder_saved_by_diffusers_loads_and_tokenizes_as_transformers(saved_pipeline, hf_models, transformers):
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not (saved_pipeline / "tokenizer" / "vocab.json").exists()  # the case this test is for
    models = load(saved_pipeline)
    reference = transformers.CLIPTokenizer.from_pretrained(saved_pipeline / "tokenizer")
    prompts = ["a photo of a cat", "A Photo Of A CAT, McDonald's", "café naïve, über Ångström", "emoji 😀 👍🏽 🎉",
               "中文 你好, 한국어", "  spaces\tand\nlines ", "it's they're I'm", "(detailed:1.2), 8k " * 20]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert models.tokenizer(prompts).tolist() == expected
    unet, vae, clip = hf_models
    gen = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 48, generator=gen), torch.tensor([10])
    assert rel_err(models.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample) < REL_TOL
    image = torch.randn(1, 3, 32, 32, generator=gen)
    assert rel_err(models.vae.encode(image).mean, vae.encode(image).latent_dist.mean) < REL_TOL
    ids = torch.tensor(expected)
    assert rel_err(models.text_encoder(ids), clip(ids).last_hidden_state) < REL_TOL


def files_read(monkeypatch) -> list[str]:
    """Record the names of the weight files load() opens."""
    names, read = [], ckpt.read_tensors
    monkeypatch.setattr("efddpm.checkpoint.diffusers.read_tensors",  # where the diffusers reader looks it up
                        lambda path, device=None: names.append(path.name) or read(path, device))
    return names


def test_fp16_variant_is_read_when_it_is_the_only_one_or_float16_is_asked(tmp_path, hf_models, loaded, monkeypatch):
    fp16 = write_diffusers_folder(tmp_path / "fp16", hf_models, variant="fp16", dtype=torch.float16)
    names = files_read(monkeypatch)
    models = load(fp16)  # only fp16 files: read, then cast to float32
    assert names == ["diffusion_pytorch_model.fp16.safetensors"] * 2 + ["model.fp16.safetensors"]
    for ours, reference in ((models.unet, loaded.unet), (models.text_encoder, loaded.text_encoder)):
        assert all(torch.equal(a, b.half().float()) for a, b in zip(ours.state_dict().values(),
                                                                      reference.state_dict().values()))
    for sub in ("unet", "vae", "text_encoder"):  # both variants present: dtype decides
        for f in (tmp_path / "fp16" / sub).glob("*.fp16.safetensors"):
            shutil.copy(f, f.with_name(f.name.replace(".fp16", "")))
    names.clear()
    load(fp16, dtype=torch.float16)
    load(fp16)
    assert names == ["diffusion_pytorch_model.fp16.safetensors"] * 2 + ["model.fp16.safetensors"] \
        + ["diffusion_pytorch_model.safetensors"] * 2 + ["model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_loads_in_any_floating_dtype(folder, loaded, dtype):
    models = load(folder, dtype=dtype)
    for ours, reference in ((models.unet, loaded.unet), (models.vae, loaded.vae),
                            (models.text_encoder, loaded.text_encoder)):
        assert all(torch.equal(a, b.to(dtype)) for a, b in zip(ours.state_dict().values(),
                                                                reference.state_dict().values()))


# ---------------------------------------------------------------- single files

def test_save_single_file_round_trip_is_bit_identical(tmp_path, loaded):
    path = tmp_path / "tiny.safetensors"
    save_single_file(path, loaded.unet, loaded.vae, loaded.text_encoder)
    again = load(path)
    for a, b in ((again.unet, loaded.unet), (again.vae, loaded.vae), (again.text_encoder, loaded.text_encoder)):
        assert a.config == b.config
        assert_same_weights(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temporary file left behind
    save_single_file(path, loaded.unet, loaded.vae, loaded.text_encoder)  # replaces the file


def test_metadata_configs_restore_what_shapes_cannot_tell(tmp_path):
    """Heads and norm groups are not in the shapes: the metadata carries them."""
    clip_config = CLIPTextConfig(width=64, layers=2, heads=4, mlp_width=128)
    models = [randomize_(cls(config), seed) for seed, (cls, config) in
              enumerate(((UNet, SMALL_UNET), (AutoencoderKL, SMALL_VAE), (CLIPTextModel, clip_config)))]
    save_single_file(tmp_path / "small.safetensors", *models, image_size=32)
    again = load(tmp_path / "small.safetensors")
    assert (again.unet.config, again.vae.config, again.text_encoder.config) == (SMALL_UNET, SMALL_VAE, clip_config)
    assert again.image_size == 32
    assert_same_weights(again.unet, models[0])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_file_without_metadata_loads_with_configs_inferred_from_shapes(tmp_path, loaded, suffix):
    tensors = single_file_tensors(loaded.unet, loaded.vae, loaded.text_encoder)
    tensors |= {"alphas_cumprod": torch.linspace(1, 0, 1000), "logvar": torch.zeros(1000),
                ckpt.TEXT_PREFIX + "embeddings.position_ids": torch.arange(77.0)[None] + 1e-3}  # known extras
    path = tmp_path / f"sd{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 6}, path)
    else:
        save_file(tensors, path)
    models = load(path)
    assert (models.unet.config, models.vae.config, models.text_encoder.config) == (SD1_LIKE_UNET, SD1_LIKE_VAE, SD1_LIKE_CLIP)
    assert_same_weights(models.unet, loaded.unet)
    assert_same_weights(models.text_encoder, loaded.text_encoder)
    assert torch.equal(models.alphas_cumprod, torch.linspace(1, 0, 1000))
    assert models.image_size == 512  # no metadata: an SD1.x file


def test_text_encoder_prefix_without_text_model_loads(tmp_path, loaded):
    tensors = single_file_tensors(loaded.unet, loaded.vae, loaded.text_encoder)
    tensors = {k.replace(ckpt.TEXT_PREFIX, ckpt.TEXT_PREFIX_SHORT): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "short.safetensors")
    assert_same_weights(load(tmp_path / "short.safetensors").text_encoder, loaded.text_encoder)


def full_file(loaded, raw: UNet) -> dict:
    """A full (non-pruned) file: raw UNet under model.diffusion_model., the EMA one (loaded.unet) dot-less."""
    tensors = single_file_tensors(raw, loaded.vae, loaded.text_encoder)
    tensors |= {ckpt.EMA_PREFIX + k.replace(".", ""): v for k, v in loaded.unet.state_dict().items()}
    tensors |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    return tensors | {name: torch.rand(1000) for name in ckpt.SCHEDULE_BUFFERS}


def test_full_file_gives_ema_or_raw_unet(tmp_path, loaded):
    raw = randomize_(UNet(SD1_LIKE_UNET), seed=7)
    save_file(full_file(loaded, raw), tmp_path / "full.safetensors")
    assert_same_weights(load(tmp_path / "full.safetensors").unet, loaded.unet)
    assert_same_weights(load(tmp_path / "full.safetensors", unet_weights="raw").unet, raw)


def test_lightning_era_ckpt_loads_without_unpickling_its_objects(tmp_path, loaded, monkeypatch):
    """SD v1.x .ckpt files pickle, next to "state_dict", Lightning's ModelCheckpoint class (a key of
    "callbacks") and numpy float64 scalars: globals that weights_only=True refuses. Write such a file under
    the same global names (pytorch_lightning is not installed: stand-ins play its part), then load it."""

    class ModelCheckpoint:
        pass

    def scalar(dtype, data):  # numpy 1.x's numpy.core.multiarray.scalar, as the pickle names it
        raise AssertionError("only written into the pickle, never called")

    class Float64Score:
        def __reduce__(self):
            return scalar, (np.dtype("f8"), b"\x00" * 7 + b"\x40")

    for package in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for module_name, obj in (("pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint),
                             ("numpy.core.multiarray", scalar)):
        obj.__module__, obj.__qualname__ = module_name, obj.__name__
        module = types.ModuleType(module_name)
        setattr(module, obj.__name__, obj)
        monkeypatch.setitem(sys.modules, module_name, module)
    state = {"state_dict": single_file_tensors(loaded.unet, loaded.vae, loaded.text_encoder), "global_step": 470000,
             "callbacks": {ModelCheckpoint: {"best_model_score": Float64Score(), "best_model_path": "x.ckpt"}}}
    torch.save(state, tmp_path / "sd-v1-x.ckpt")
    monkeypatch.undo()  # the stand-in modules are gone again
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "sd-v1-x.ckpt"))
    assert needed == {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                      "numpy.core.multiarray.scalar", "numpy.dtype"}
    assert_same_weights(load(tmp_path / "sd-v1-x.ckpt").unet, loaded.unet)


# ---------------------------------------------------------------- hub (offline, hand-made cache)

@pytest.fixture
def hub_cache(tmp_path, folder, monkeypatch):
    """A huggingface_hub cache holding efddpm-test/tiny-sd at commit `revision` (refs/main points to it)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--efddpm-test--tiny-sd"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return revision


def test_hub_id_loads_from_the_cache_offline(hub_cache, loaded, monkeypatch):
    models = load("efddpm-test/tiny-sd", offline=True)
    assert models.source == "efddpm-test/tiny-sd"
    assert_same_weights(models.unet, loaded.unet)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert_same_weights(load("efddpm-test/tiny-sd", revision=hub_cache).vae, loaded.vae)


SD15_FILES = [  # the layout of stable-diffusion-v1-5/stable-diffusion-v1-5 (weights, configs, extras)
    "model_index.json", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "scheduler/scheduler_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors", "unet/config.json",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors"]


@pytest.mark.parametrize("kwargs, weights", [
    ({}, ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
          "text_encoder/model.safetensors"]),
    ({"dtype": torch.float16}, ["unet/diffusion_pytorch_model.fp16.safetensors",
                                "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"]),
    ({"unet_weights": "raw"}, ["unet/diffusion_pytorch_model.non_ema.safetensors",
                               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]),
])
def test_hub_download_is_limited_to_the_files_load_reads(monkeypatch, kwargs, weights):
    class Hub:
        def model_info(self, repo_id, revision):
            return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in SD15_FILES])

    class Downloaded(Exception):
        pass

    def snapshot_download(repo_id, **kwargs):
        raise Downloaded(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(Downloaded) as call:
        load("stable-diffusion-v1-5/stable-diffusion-v1-5", offline=False, **kwargs)
    assert call.value.args[0] == {"revision": None, "allow_patterns": ckpt.HUB_CONFIG_FILES + weights,
                                  "local_files_only": False}


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, loaded, monkeypatch):
    class Hub:
        def model_info(self, repo_id, revision):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert_same_weights(load("efddpm-test/tiny-sd", offline=False).unet, loaded.unet)
    with pytest.raises(CheckpointError, match=r"not in the cache .* and the hub answered ConnectionError: Name or"):
        load("efddpm-test/other", offline=False)


def test_hub_repo_without_diffusers_layout_points_to_its_single_files(monkeypatch):
    class Hub:
        def model_info(self, repo_id, revision):
            return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename="sd-v1-4.ckpt")])

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    with pytest.raises(CheckpointError, match=r"has no diffusers layout .*single files \(sd-v1-4\.ckpt\)"):
        load("CompVis/stable-diffusion-v-1-4-original", offline=False)


def test_uncached_hub_id_offline_is_refused(hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"^efddpm-test/other: no such local path, and as a hub repo \(revision "
                                              r"main\) it is not in the cache .*hub and offline mode is on$"):
        load("efddpm-test/other")


# ---------------------------------------------------------------- refusals

@pytest.fixture
def tensors(loaded):
    """A valid tiny single file's tensors, to break."""
    return single_file_tensors(loaded.unet, loaded.vae, loaded.text_encoder)


def load_tensors(tmp_path, tensors, **kwargs):
    save_file(tensors, tmp_path / "bad.safetensors")
    return load(tmp_path / "bad.safetensors", **kwargs)


ATTN_K = ckpt.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(ATTN_K), r"UNet does not match its config: 1 missing \(input_blocks\.1\.1\.transformer_blocks"),
    (lambda t: t.update({ckpt.UNET_PREFIX + "extra.weight": torch.zeros(1)}), r"UNet .*1 unexpected \(extra\.weight\)"),
    (lambda t: t.update({"step": torch.zeros(1)}), r"bad\.safetensors: 1 unexpected tensors \(step\)"),
    (lambda t: t.update({ckpt.UNET_PREFIX + "out.0.weight": torch.zeros(33)}), r"1 mis-shaped \(out\.0\.weight "
                                                                             r"\[33\] \(model \[32\]\)\)$"),
    (lambda t: t.update({ATTN_K: torch.zeros(32, 1024)}), r"is an SD 2\.x checkpoint \(cross-attention width 1024"),
    (lambda t: t.update({"cond_stage_model.model.ln_final.weight": torch.zeros(1)}),
     r"is an SD 2\.x checkpoint \(OpenCLIP"),
    (lambda t: t.update({"conditioner.embedders.0.transformer.x": torch.zeros(1)}), r"is an SDXL checkpoint"),
    (lambda t: [t.pop(k) for k in list(t) if not k.startswith(ckpt.VAE_PREFIX)], r"holds a VAE alone"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith(ckpt.TEXT_PREFIX)], r"no text encoder"),
    (lambda t: t.update({ckpt.TEXT_PREFIX_SHORT + "final_layer_norm.bias": torch.zeros(48)}),
     r"text encoder \(cond_stage_model\.transformer\.\*\): both final_layer_norm\.bias and "
     r"text_model\.final_layer_norm\.bias map to final_layer_norm\.bias"),
])
def test_broken_single_files_are_refused_naming_the_keys(tmp_path, tensors, change, message):
    change(tensors)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(tmp_path, tensors)


def test_raw_unet_from_a_pruned_file_is_refused(tmp_path, tensors):
    with pytest.raises(CheckpointError, match=r"single UNet copy.*unet_weights='raw' needs a full file"):
        load_tensors(tmp_path, tensors, unet_weights="raw")


def test_incomplete_ema_copy_is_refused(tmp_path, loaded):
    tensors = full_file(loaded, randomize_(UNet(SD1_LIKE_UNET), seed=7))
    tensors.pop(ckpt.EMA_PREFIX + "out2weight")
    with pytest.raises(CheckpointError, match=r"EMA UNet copy has 1 missing \(model_ema\.diffusion_modelout2weight\)"):
        load_tensors(tmp_path, tensors)


def test_metadata_config_that_contradicts_the_shapes_is_refused(tmp_path, loaded):
    path = tmp_path / "tiny.safetensors"
    save_single_file(path, loaded.unet, loaded.vae, loaded.text_encoder)
    tensors, metadata = ckpt.read_tensors(path)
    configs = json.loads(metadata["efddpm"])
    configs["unet"]["context_dim"] = 64
    save_file(tensors, path, metadata={"efddpm": json.dumps(configs)})
    with pytest.raises(CheckpointError, match=r"UNet does not match its config: .*mis-shaped"):
        load(path)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    models = [cls(config) for cls, config in ((UNet, SD1_LIKE_UNET), (AutoencoderKL, SD1_LIKE_VAE),
                                              (CLIPTextModel, CLIPTextConfig(vocab_size=1000, width=48, layers=1)))]
    save_single_file(tmp_path / "small-vocab.safetensors", *models)
    with pytest.raises(CheckpointError, match=r"tokenizer has 49408 tokens, the text encoder embeds only 1000"):
        load(tmp_path / "small-vocab.safetensors")


def test_truncated_and_garbage_files_are_refused(tmp_path, loaded):
    path = tmp_path / "cut.safetensors"
    save_single_file(path, loaded.unet, loaded.vae, loaded.text_encoder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: unreadable \.safetensors file"):
        load(path)
    torch.save({"state_dict": single_file_tensors(loaded.unet, loaded.vae, loaded.text_encoder)}, tmp_path / "cut.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cut.ckpt").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a torch zip archive \(truncated or corrupted"):
        load(tmp_path / "cut.ckpt")
    for name, message in (("junk.safetensors", r"unreadable \.safetensors file"),
                          ("junk.ckpt", r"not a torch zip archive")):
        (tmp_path / name).write_bytes(b"\x07 not a checkpoint " * 100)
        with pytest.raises(CheckpointError, match=rf"{name}: {message}"):
            load(tmp_path / name)


executed = []


def _record_execution(*args):
    executed.append(args)


class Payload:
    def __reduce__(self):
        return _record_execution, ("pwned",)


def test_ckpt_needing_arbitrary_objects_is_refused_without_running_them(tmp_path, tensors):
    torch.save({"state_dict": tensors, "hook": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: unpickling it needs \S*test_checkpoint\._record_execution, "
                                              r"and efddpm never unpickles arbitrary objects"):
        load(tmp_path / "evil.ckpt")
    assert executed == []


@pytest.mark.parametrize("field, value, message", [
    ("use_linear_projection", True, r"use_linear_projection=True is not supported \(SD1\.x: False, as in SD 2\.x\)"),
    ("cross_attention_dim", 1024, r"cross_attention_dim=1024 is not supported"),
    ("addition_embed_type", "text_time", r"addition_embed_type='text_time' is not supported .*SDXL"),
    ("transformer_layers_per_block", [1, 2, 10], r"transformer_layers_per_block=\[1, 2, 10\] is not supported"),
    ("attention_head_dim", [5, 10, 20], r"per-level attention_head_dim=\[5, 10, 20\]"),
])
def test_unsupported_unet_configs_are_refused_by_field(field, value, message):
    config = diffusers_unet_config(SD1_LIKE_UNET) | {field: value}
    with pytest.raises(CheckpointError, match=message):
        ckpt.unet_config_from_diffusers(config)


def test_other_text_encoders_are_refused_by_field():
    with pytest.raises(CheckpointError, match=r"hidden_act='gelu' is not supported .*OpenCLIP"):
        ckpt.clip_config_from_transformers({"hidden_act": "gelu", "hidden_size": 1024})
    with pytest.raises(CheckpointError, match=r"architectures=\['CLIPTextModelWithProjection'\]"):
        ckpt.clip_config_from_transformers({"architectures": ["CLIPTextModelWithProjection"]})


def test_folders_of_other_kinds_are_refused(tmp_path, folder, hf_models):
    vprediction = shutil.copytree(folder, tmp_path / "v")
    (vprediction / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match=r"prediction_type='v_prediction'; SD1\.x predicts 'epsilon'"):
        load(vprediction)
    (vprediction / "text_encoder_2").mkdir()
    with pytest.raises(CheckpointError, match=r"is an SDXL pipeline folder"):
        load(vprediction)
    hf_models[1].save_pretrained(tmp_path / "vae-alone")
    with pytest.raises(CheckpointError, match=r"vae-alone holds a AutoencoderKL alone"):
        load(tmp_path / "vae-alone")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a diffusers Stable Diffusion folder, missing unet/, "
                                              r"vae/, text_encoder/, tokenizer/"):
        load(tmp_path / "empty")
    no_tokenizer = shutil.copytree(folder, tmp_path / "no-tokenizer")
    for f in (no_tokenizer / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no-tokenizer: tokenizer: .* has no tokenizer\.json, nor "
                                              r"vocab\.json and merges\.txt \(vocab\.json not found\)"):
        load(no_tokenizer)
    no_weights = shutil.copytree(folder, tmp_path / "no-weights")
    (no_weights / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in vae/ \(looked for diffusion_pytorch_model\.safetensors"):
        load(no_weights)
    with pytest.raises(CheckpointError, match=r"no weights in unet/ \(looked for diffusion_pytorch_model\.non_ema"):
        load(folder, unet_weights="raw")


def test_bad_arguments_and_paths_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such file or folder"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"unet_weights must be 'ema' or 'raw'"):
        load(tmp_path, unet_weights="latest")
    with pytest.raises(CheckpointError, match=r"writes \.safetensors files only"):
        save_single_file(tmp_path / "x.ckpt", None, None, None)
