"""Writing a model package: the folder with the network's weights (safetensors), its ONNX export and the card
recording every file's sha256 (needs torch)."""

from __future__ import annotations

import copy
import datetime
import json
import os
import warnings
from pathlib import Path

from samless.card import FileEntry, ModelCard
from samless.imageio import atomic_folder, refuse_existing
from samless.package import CARD_NAME, ONNX_NAME, WEIGHTS_NAME, sha256_bytes


def created_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def save_package(net, card: ModelCard, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 onnx: bool = True, half: bool = False) -> Path:
    """Write `net` (a SAMLessNet) and `card` as a model package folder, atomically (needs torch).

    `half` stores the weights as float16 (half the size). They are rounded once, before the ONNX export,
    so both backends compute with the very same values (in float32).
    """
    import torch
    from safetensors.torch import save_file

    from samless.modeling import LesionProbability

    out_dir = Path(out_dir)
    refuse_existing([out_dir], overwrite, "choose another folder")
    with atomic_folder(out_dir) as staging:
        net = copy.deepcopy(net).eval().cpu()
        if half:
            with torch.no_grad():
                for tensor in net.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.half().float())
        state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().clone()
                 for k, v in net.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME))
        if onnx:
            size = card.architecture.input_size
            dummy = torch.zeros(1, card.architecture.in_channels, size, size)
            with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer notes
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    LesionProbability(net), (dummy,), str(staging / ONNX_NAME), input_names=["image"],
                    output_names=["probability"], dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}},
                    opset_version=17, dynamo=False,
                )
        files = {p.name: FileEntry(sha256_bytes(p.read_bytes()), p.stat().st_size) for p in sorted(staging.iterdir())}
        card = card.replace(weights_dtype="float16" if half else "float32", files=files,
                            created=card.created or created_now())
        (staging / CARD_NAME).write_text(json.dumps(card.to_json(), indent=2) + "\n", encoding="utf-8")
    return out_dir
