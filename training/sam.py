"""The frozen SAM teacher of phase 1: the only module in samless that imports segment_anything.

SAM's image encoder embeds a slice once; the prompt learner's dense embedding replaces the prompt
encoder's output; SAM's mask decoder turns both into a mask. Nothing of SAM is trained.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samless.errors import SamlessError

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "vit_tiny")  # vit_tiny: a small random config for tests only
EMBED_SIZE = 64  # SAM's image embedding is 256 x 64 x 64 for a 1024 x 1024 input


def _build_tiny():
    """A structurally complete, small SAM (for tests and development, random weights only)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=14,
                              out_chans=256, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def build_sam(sam_type: str = "vit_b", checkpoint: str | Path | None = None):
    """SAM (or MedSAM) from segment_anything's registry, with weights from a local checkpoint.

    Checkpoints: the official .pth files (read with torch.load(weights_only=True): tensors only, no
    arbitrary objects) or .safetensors. None gives random weights (tests, timing).
    """
    from segment_anything import sam_model_registry

    if sam_type not in SAM_TYPES:
        raise SamlessError(f"unknown SAM type {sam_type!r}; use one of {', '.join(SAM_TYPES)}.")
    sam = _build_tiny() if sam_type == "vit_tiny" else sam_model_registry[sam_type](checkpoint=None)
    if checkpoint is not None:
        sam.load_state_dict(_read_checkpoint(Path(checkpoint), sam, sam_type))
    return sam


def _read_checkpoint(path: Path, sam: nn.Module, sam_type: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SamlessError(f"SAM checkpoint {path} does not exist; download sam_{sam_type}_*.pth (or MedSAM) "
                           "and give its path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
        raise SamlessError(f"{path} is not a readable SAM checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}).") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some fine-tuned checkpoints (e.g. MedSAM training) nest the weights
    expected = sam.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise SamlessError(f"{path} is not a SAM {sam_type} checkpoint (its tensors do not match SAM's); "
                           "check the file and --sam-type.")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise SamlessError(f"{path} holds a different SAM size than {sam_type} ({wrong[0]}: "
                           f"{tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}); fix --sam-type.")
    return state


class SAMTeacher(nn.Module):
    """Frozen SAM: `encode` slices to image embeddings, `decode` them with a dense prompt to mask logits."""

    def __init__(self, sam: nn.Module, in_channels: int = 1, intensity_range: float = 2.0):
        super().__init__()
        self.sam = sam
        self.in_channels = in_channels
        self.intensity_range = intensity_range
        self._adapt_patch_embedding(in_channels)
        self.sam.eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)

    def _adapt_patch_embedding(self, in_channels: int) -> None:
        """Make SAM take `in_channels` channels, as the paper does for one.

        The RGB kernel is summed over colour (3 x the average), then shared equally by the new channels,
        so a slice repeated on every channel gets the response the original gives the grey RGB image.
        """
        proj = self.sam.image_encoder.patch_embed.proj
        grey = proj.weight.detach().sum(dim=1, keepdim=True)
        new = nn.Conv2d(in_channels, proj.out_channels, proj.kernel_size, proj.stride, proj.padding,
                        bias=proj.bias is not None)
        with torch.no_grad():
            new.weight.copy_(grey.repeat(1, in_channels, 1, 1) / in_channels)
            if proj.bias is not None:
                new.bias.copy_(proj.bias)
        self.sam.image_encoder.patch_embed.proj = new
        self.register_buffer("pixel_mean", self.sam.pixel_mean.mean().reshape(1, 1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", self.sam.pixel_std.mean().reshape(1, 1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> SAMTeacher:
        return super().train(False)  # always frozen, always eval

    def to_sam_input(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised slices (B,C,S,S) -> SAM's pixel scale and 1024 x 1024."""
        pixels = (image / self.intensity_range).clamp(0, 1) * 255.0
        pixels = (pixels - self.pixel_mean) / self.pixel_std
        size = self.sam.image_encoder.img_size
        return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B,C,S,S) slices -> (B,256,64,64) image embeddings."""
        return self.sam.image_encoder(self.to_sam_input(image))

    def decode(self, image_embeddings: torch.Tensor, dense_prompt: torch.Tensor, out_size: int) -> torch.Tensor:
        """Mask logits (B,1,out,out) from image embeddings and the learner's dense prompt embeddings.

        SAM's decoder pairs one image with a batch of prompts, so images go through it one at a time.
        """
        pe = self.sam.prompt_encoder.get_dense_pe()
        sparse = dense_prompt.new_zeros((1, 0, dense_prompt.shape[1]))
        masks = []
        for emb, prompt in zip(image_embeddings, dense_prompt):
            low_res, _ = self.sam.mask_decoder(image_embeddings=emb[None].to(dense_prompt.dtype), image_pe=pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=prompt[None],
                                               multimask_output=False)
            masks.append(low_res)
        return F.interpolate(torch.cat(masks), size=(out_size, out_size), mode="bilinear", align_corners=False)
