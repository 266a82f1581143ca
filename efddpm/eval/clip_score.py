"""CLIP score: how well an image matches a prompt (the paper's Sec. 4; PIE-Bench's "CLIP similarity").

For an image I and a prompt C, as torchmetrics' CLIPScore defines it (Hessel et al., 2021, without their w = 2.5):

    CLIPScore(I, C) = max(100 cos(E_I, E_C), 0)

E_I is CLIP's image embedding (the checkpoint's processor: shorter side resized to 224, centre crop 224 x 224,
CLIP's mean and std; the vision tower's pooled output through the visual projection) and E_C the text embedding
(the tokenized prompt, padded, cut at the text tower's 77 positions as torchmetrics cuts it; the end-of-text
token's output through the text projection). PnPInversion scores one image at a time, so each pair is clamped at
0 before any average; so is each score here. PIE-Bench's "edited" variant scores image x mask, the edited region
kept and the rest black (mask: efddpm.eval.edited_region(rle), its border included as the reference decodes it).

The model comes from a Hugging Face hub id or a local folder in the transformers layout (CLIPModel and
CLIPProcessor), through transformers' cache; the default, as in the paper and PIE-Bench, is CLIP ViT-L/14.
"""
from __future__ import annotations

import torch

from efddpm.core.checks import InputError
from efddpm.eval.optional import require
from efddpm.eval.pixels import checked_region, rgb_pixels

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def embedding(output) -> torch.Tensor:
    """The projected embedding [N, D] that get_image_features / get_text_features return: the tensor itself
    (transformers 4) or the pooled output of the returned model output (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """CLIP scores of (image, prompt) pairs with one CLIPModel and its CLIPProcessor (transformers)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> "CLIPScorer":
        """The model and processor of a hub id or local folder, or a one-line InputError saying where they were
        looked for (the folder, the Hugging Face cache, the hub)."""
        transformers = require("transformers", "the CLIP score")
        try:
            model = transformers.CLIPModel.from_pretrained(name_or_path)
            processor = transformers.CLIPProcessor.from_pretrained(name_or_path)
        except OSError as e:
            from huggingface_hub.constants import HF_HUB_CACHE
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"CLIP model {name_or_path!r} not found: not a local folder with a CLIPModel and its "
                             f"processor, not in the Hugging Face cache ({HF_HUB_CACHE}), and not downloadable "
                             f"from the hub ({reason})") from None
        return cls(model.to(device), processor)

    @torch.no_grad()
    def image_embeddings(self, images: list[torch.Tensor]) -> torch.Tensor:
        """E_I [N, D] of uint8 images [3, H, W]."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]     # [N, 3, 224, 224]
        device = next(self.model.parameters()).device
        return embedding(self.model.get_image_features(pixel_values=pixels.to(device)))

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """E_C [N, D] of prompts; tokens past the text tower's positions are cut off."""
        tokens = self.processor(text=prompts, return_tensors="pt", padding=True)
        n = self.model.config.text_config.max_position_embeddings
        ids, attention = tokens["input_ids"][:, :n], tokens["attention_mask"][:, :n]     # [N, L <= 77]
        device = next(self.model.parameters()).device
        return embedding(self.model.get_text_features(input_ids=ids.to(device), attention_mask=attention.to(device)))

    def __call__(self, images, prompts) -> torch.Tensor:
        """max(100 cos(E_I, E_C), 0) for each pair [N]; images as efddpm.eval.rgb_pixels reads them."""
        images, prompts = list(images), [prompts] if isinstance(prompts, str) else list(prompts)
        if len(images) != len(prompts) or not images:
            raise InputError(f"CLIP score takes one prompt per image, got {len(images)} images and "
                             f"{len(prompts)} prompts")
        e_i = self.image_embeddings([rgb_pixels(image) for image in images]).float()      # [N, D]
        e_c = self.text_embeddings(prompts).float()                                        # [N, D]
        cos = (e_i / e_i.norm(dim=-1, keepdim=True) * e_c / e_c.norm(dim=-1, keepdim=True)).sum(-1)  # [N]
        return (100 * cos).clamp(min=0).cpu()

    def on_region(self, images, prompts, regions) -> torch.Tensor:
        """PIE-Bench's edited-region score: each image times its region ([H, W] of 0/1, the edited mask), [N]."""
        images, regions, masked = list(images), list(regions), []
        if len(regions) != len(images):
            raise InputError(f"the edited-region CLIP score takes one region per image, got {len(images)} images "
                             f"and {len(regions)} regions")
        for image, region in zip(images, regions):
            pixels = rgb_pixels(image)                                                     # [3, H, W] uint8
            masked.append((pixels * checked_region(region, pixels)).to(torch.uint8))
        return self(masked, prompts)
