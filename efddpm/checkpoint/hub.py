"""The Hugging Face hub: a repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5") in the diffusers layout
becomes a local folder of the huggingface_hub cache, downloading only the files load() reads (or, offline
or when the hub cannot be reached, taking them from the cache)."""
import re
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # a lazy submodule: import it by name

from efddpm.checkpoint.common import CheckpointError, examples, first_line
from efddpm.checkpoint.diffusers import first_weights_file
from efddpm.checkpoint.tensors import TORCH_SUFFIXES


# tokenizer/: tokenizer.json (diffusers folders saved with transformers >= 5) or vocab.json + merges.txt (older
# ones, the hub's SD1.5): whichever the repo has is fetched, CLIPTokenizer.from_folder picks
HUB_CONFIG_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                    "scheduler/scheduler_config.json"]


def is_repo_id(s: str) -> bool:
    """"org/name", not a path to a missing file ("./x", "dir/model.ckpt")."""
    looks_like_file = s.startswith(".") or s.endswith((".safetensors", *TORCH_SUFFIXES))
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not looks_like_file


def hub_snapshot(repo_id: str, *, revision: str | None, offline: bool | None, prefer_fp16: bool,
                 unet_weights: str) -> Path:
    """Local folder of the repo's diffusers files, downloaded (only the files load() reads) or from the cache."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE if offline is None else offline
    reason = "offline mode is on"
    patterns = list(HUB_CONFIG_FILES)
    if not offline:
        try:
            remote = {s.rfilename for s in huggingface_hub.HfApi().model_info(repo_id, revision=revision).siblings}
        except Exception as e:  # unreachable, unknown, gated...: fall back to the cache, as huggingface_hub does
            offline, reason = True, f"the hub answered {type(e).__name__}: {first_line(e)}"
        else:
            patterns += _pick_hub_weights(remote, repo_id, prefer_fp16, unet_weights)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                      local_files_only=offline))
    except (OSError, ValueError) as e:
        if offline:
            cache = huggingface_hub.constants.HF_HUB_CACHE
            raise CheckpointError(f"{repo_id}: no such local path, and as a hub repo (revision {revision or 'main'}) "
                                  f"it is not in the cache {cache} and {reason}") from None
        raise CheckpointError(f"{repo_id}: download failed: {type(e).__name__}: {first_line(e)}") from None


def _pick_hub_weights(remote: set[str], repo_id: str, prefer_fp16: bool, unet_weights: str) -> list[str]:
    """Repo paths of the weights files to download: the first existing candidate of each component."""
    if "unet/config.json" not in remote:
        singles = sorted(f for f in remote if f.endswith((".safetensors", ".ckpt")) and "/" not in f)
        raise CheckpointError(f"{repo_id} has no diffusers layout (unet/config.json)"
                              + (f"; download one of its single files ({examples(singles)}) and load that path"
                                 if singles else ""))
    return [first_weights_file(component, remote.__contains__, repo_id, prefer_fp16=prefer_fp16,
                               raw_unet=unet_weights == "raw")
            for component in ("unet", "vae", "text_encoder")]
