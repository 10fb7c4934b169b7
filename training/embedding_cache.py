"""A disk cache of SAM image-encoder outputs, so phase 1 pays for the ViT once per slice.

SAM's image encoder is frozen, so its embedding of a given input never changes. Entries are keyed by
(case, slice, geometric variant) and stored in fp16, one memory-mapped file per case
(slices x variants x 256 x 64 x 64, ~2 MB an entry; the file is sparse until filled) plus a byte
map of which entries are filled. What the cache allows: the discrete geometric variants (left-right
flip, quarter turns) and intensity augmentation of the learner's input (SAM sees the slice without
it). Continuous affine transforms and crop jitter are switched off while the cache is used, since
SAM's input would differ every time.

Several processes (DataLoader workers, DDP ranks) may fill the same file: an entry is written
before its flag, and two writers of one entry write identical bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from samless.errors import SamlessError

ENTRY_SHAPE = (256, 64, 64)


class EmbeddingCache:
    def __init__(self, root: str | Path, identity: dict, n_slices: dict[str, int], n_variants: int):
        """`identity` names what the embeddings depend on (SAM type and checkpoint, preprocessing)."""
        self.root = Path(root)
        self.n_slices, self.n_variants = n_slices, n_variants
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "cache.json"
        record = {"identity": identity, "n_variants": n_variants, "entry_shape": ENTRY_SHAPE, "dtype": "float16"}
        if meta.exists():
            if json.loads(meta.read_text(encoding="utf-8")) != json.loads(json.dumps(record)):
                raise SamlessError(f"embedding cache {self.root} was made with another SAM checkpoint or "
                                   "preprocessing; give another --embedding-cache folder or delete this one.")
        else:
            meta.write_text(json.dumps(record, indent=2), encoding="utf-8")
        self._data: dict[str, np.memmap] = {}
        self._flags: dict[str, np.memmap] = {}

    def _files(self, case: str) -> tuple[np.memmap, np.memmap]:
        if case not in self._data:
            n = self.n_slices[case] * self.n_variants
            stem = self.root / hashlib.sha1(case.encode()).hexdigest()[:12]
            data_path, flag_path = stem.with_suffix(".f16"), stem.with_suffix(".flags")
            for path, nbytes in ((data_path, n * int(np.prod(ENTRY_SHAPE)) * 2), (flag_path, n)):
                if not path.exists():
                    with open(path, "wb") as f:
                        f.truncate(nbytes)  # sparse: takes disk only as entries are written
            self._data[case] = np.memmap(data_path, np.float16, "r+", shape=(n, *ENTRY_SHAPE))
            self._flags[case] = np.memmap(flag_path, np.uint8, "r+", shape=(n,))
        return self._data[case], self._flags[case]

    def _index(self, case: str, slice_index: int, variant: int) -> int:
        return slice_index * self.n_variants + variant

    def get(self, case: str, slice_index: int, variant: int) -> np.ndarray | None:
        data, flags = self._files(case)
        i = self._index(case, slice_index, variant)
        return np.asarray(data[i]) if flags[i] else None

    def put(self, case: str, slice_index: int, variant: int, embedding: np.ndarray) -> None:
        data, flags = self._files(case)
        i = self._index(case, slice_index, variant)
        data[i] = embedding.astype(np.float16)
        flags[i] = 1

    def fetch(self, cases: list[str], slices: list[int], variants: list[int], images: torch.Tensor,
              encode) -> torch.Tensor:
        """Embeddings for a batch: cached ones read, missing ones computed with `encode` and stored."""
        found = [self.get(c, s, v) for c, s, v in zip(cases, slices, variants)]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            computed = encode(images[missing]).float().cpu().numpy()
            for i, emb in zip(missing, computed):
                self.put(cases[i], slices[i], variants[i], emb)
                found[i] = emb.astype(np.float16)  # what a later read returns
        return torch.from_numpy(np.stack(found).astype(np.float32))

    @property
    def filled(self) -> int:
        return sum(int(f.sum()) for f in self._flags.values())
