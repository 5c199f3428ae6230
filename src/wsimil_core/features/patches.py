"""Reading and encoding the patches of one slide: a ``Dataset`` read by ``DataLoader`` worker processes (each
opens its own slide handle) and the batched encoder loop (CUDA + float16 autocast when present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wsimil_core.devices import single_thread_worker
from wsimil_core.features.encoders import EncoderSpec, encode_tensor, module_device, preprocess_batch
from wsimil_core.wsi.slide import open_slide

__all__ = ["PatchDataset", "encode_slide_patches"]


class PatchDataset(torch.utils.data.Dataset):
    """Patches of one slide at level-0 coordinates, read with ``Slide.read_patch``.

    The slide is opened lazily in whichever process calls ``__getitem__`` first, so every DataLoader worker
    opens its own handle (handles are never pickled or shared across processes).

    Item ``i``: uint8 tensor ``[patch_px, patch_px, 3]`` (RGB) of the region ``coords[i]`` .. ``+ size_level0``.
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        size_level0: int,
        patch_px: int,
        slide_mpp: float | None = None,
        backend: str = "auto",
    ):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size_level0 = int(size_level0)
        self.patch_px = int(patch_px)
        self.slide_mpp = slide_mpp
        self.backend = backend
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path, backend=self.backend, slide_mpp=self.slide_mpp)
        x, y = (int(v) for v in self.coords[i])
        patch = self._slide.read_patch(x, y, self.size_level0, self.patch_px)
        arr = np.ascontiguousarray(patch, dtype=np.uint8)
        if not arr.flags.writeable:  # e.g. a read-only view of a decoded tile
            arr = arr.copy()
        return torch.from_numpy(arr)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def close(self) -> None:
        if self._slide is not None:
            close = getattr(self._slide, "close", None)
            if close is not None:
                close()
            self._slide = None


@torch.inference_mode()
def encode_slide_patches(
    path: str | Path,
    coords: np.ndarray,
    size_level0: int,
    patch_px: int,
    model: nn.Module,
    spec: EncoderSpec,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    amp: bool = True,
    slide_mpp: float | None = None,
    backend: str = "auto",
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Encode the patches of one slide in batches; returns float32 features ``[N, spec.dim]`` (CPU numpy).

    ``num_workers`` worker processes read patches (0 = read in this process); the encoder runs on the model's
    device (float16 autocast on CUDA when ``amp``).
    """
    dataset = PatchDataset(path, coords, size_level0, patch_px, slide_mpp=slide_mpp, backend=backend)
    device = module_device(model)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=max(0, int(num_workers)),
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=single_thread_worker if num_workers > 0 else None,
    )
    out = np.empty((len(dataset), spec.dim), dtype=np.float32)
    start = 0
    bar = tqdm(total=len(dataset), desc=desc or Path(path).name, unit="patch", leave=False, disable=not progress)
    try:
        for batch in loader:
            x = preprocess_batch(spec, batch, device)
            feats = encode_tensor(model, x, amp=amp).float().cpu().numpy()
            out[start : start + len(feats)] = feats
            start += len(feats)
            bar.update(len(feats))
    finally:
        bar.close()
        dataset.close()
    if start != len(dataset):  # pragma: no cover - DataLoader contract
        raise RuntimeError(f"{path}: encoded {start} of {len(dataset)} patches")
    return out
