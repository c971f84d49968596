"""The ``tensor`` backend: whole splits as uint8 tensors in host or device memory.

The fast path for 32/64 px data: a batch is one gather (``images[idx]``) -- no decode, no
per-sample Python. Splits come from ``DIR/<split>/images.npy`` (memory-mapped by default) or
from tensors the caller already holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.base import Batch, to_device
from pipelines.sampling import IndexStream, check_rank, eval_rank_indices
from shards.format import MAX_PIXELS, DataError, check_pixels, dataset_file, load_manifest


@dataclass
class ArraySplit:
    """One split held in memory.

    Attributes:
        images: uint8 ``(N, 3, H, W)`` (host or device; may be a non-contiguous NHWC view).
        labels: int64 ``(N,)``; ``labels[i]`` belongs to the sample with stable index ``i``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"ArraySplit.images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ArraySplit.labels must be (N,) with N={self.images.shape[0]}, got "
                f"{tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(
        self, idx: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather samples ``idx`` and move them to ``device``.

        Returns:
            ``(uint8 (B, 3, H, W) contiguous, int64 (B,))`` on ``device``.
        """
        idx_src = to_device(idx, self.images.device)
        # Gather in the storage's own layout (contiguous NHWC rows for mmapped arrays: one
        # memcpy per sample), then make NCHW contiguous on the target device, where it is cheap.
        images = self.images[idx_src]
        same = self.labels.device == self.images.device
        labels = self.labels[idx_src if same else to_device(idx, self.labels.device)]
        target = torch.device(device)
        if target.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory()
        images = images.to(target, non_blocking=True).contiguous()
        return images, to_device(labels, target)


def _split_paths(root: Path, split: str) -> tuple[Path, Path]:
    manifest = root / "manifest.json"
    if manifest.is_file():
        splits = load_manifest(root, strict=False)["splits"]  # ManifestError (a ValueError) names it
        if split not in splits:
            raise ValueError(f"{manifest}: no split {split!r} (has {sorted(splits)})")
        arrays = splits[split].get("arrays")
        if not arrays:
            raise ValueError(
                f"{manifest}: split {split!r} has no uint8 arrays; rebuild the dataset with "
                "`--formats arrays` to use the tensor backend"
            )
        return dataset_file(root, arrays["images"]), dataset_file(root, arrays["labels"])
    return root / split / "images.npy", root / split / "labels.npy"


def load_array_split(
    dataset_dir: str | Path, split: str, *, mmap: bool = True, max_pixels: int = MAX_PIXELS
) -> ArraySplit:
    """Load ``DIR/<split>/images.npy`` (uint8 NHWC) and ``labels.npy`` as an :class:`ArraySplit`.

    Args:
        dataset_dir: dataset directory (with ``manifest.json``, whose ``arrays`` entry is used
            when present).
        split: split name, e.g. ``"labeled"``.
        mmap: memory-map the images (copy-on-write, so torch sees a writable buffer) instead
            of reading them into RAM.
        max_pixels: the largest image (``H * W``) accepted (``data.max_pixels``).

    Returns:
        An :class:`ArraySplit` whose ``images`` is an ``(N, 3, H, W)`` view of the NHWC file.
    """
    images_path, labels_path = _split_paths(Path(dataset_dir), split)
    for p in (images_path, labels_path):
        if not p.is_file():
            raise ValueError(f"missing array file {p}")
    try:
        images = np.load(images_path, mmap_mode="c" if mmap else None, allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable array file in {images_path.parent}: {e}") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"{images_path}: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    try:
        check_pixels(images.shape[1], images.shape[2], max_pixels)
    except ValueError as e:
        raise DataError(f"{images_path}: every {e}") from None
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected ({images.shape[0]},) labels, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path}: labels must be integers, got {labels.dtype}")
    t_images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) view of NHWC
    return ArraySplit(t_images, torch.from_numpy(labels.astype(np.int64, copy=False)))


class TensorStream:
    """Infinite, resumable :class:`~pipelines.base.TrainStream` over two in-memory splits.

    Labeled and unlabeled streams are independent :class:`~pipelines.sampling.IndexStream`\\ s
    (own epochs and reshuffles); each rank takes its contiguous slice of every global batch.

    Args:
        labeled: labeled split.
        unlabeled: unlabeled split (its ``labels`` are the true labels, diagnostics only).
        labeled_batch: labeled samples per step ``B_L``.
        unlabeled_batch: unlabeled samples per step ``B_U``.
        seed: base seed; epoch ``e`` of each stream is seeded from ``(seed, stream, e)``.
        rank: this process's rank.
        world_size: number of ranks.
        device: where batches are delivered (gathers happen where the split lives; keep the
            split on the GPU for the fastest path).
    """

    def __init__(
        self,
        labeled: ArraySplit,
        unlabeled: ArraySplit,
        *,
        labeled_batch: int,
        unlabeled_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        check_rank(rank, world_size)
        self.labeled, self.unlabeled, self.device = labeled, unlabeled, torch.device(device)
        self._lab, self._unl = (
            IndexStream(len(split), batch, seed=seed, stream=name, rank=rank, world_size=world_size)
            for name, split, batch in (
                ("labeled", labeled, labeled_batch),
                ("unlabeled", unlabeled, unlabeled_batch),
            )
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """Draw one step's :class:`Batch` and advance both streams."""
        li = self._lab.next_indices()
        ui = self._unl.next_indices()
        x_l, y_l = self.labeled.take(li, self.device)
        x_u, y_u = self.unlabeled.take(ui, self.device)
        return Batch(x_l, y_l, x_u, to_device(ui, self.device), y_u)

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": "tensor",
            "labeled": self._lab.state_dict(),
            "unlabeled": self._unl.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend", "tensor") != "tensor":
            raise ValueError(f"reader state is from backend {state.get('backend')!r}, not 'tensor'")
        self._lab.load_state_dict(state["labeled"])
        self._unl.load_state_dict(state["unlabeled"])


class TensorEval:
    """One finite pass over an :class:`ArraySplit` (an :class:`~pipelines.base.EvalSource`).

    Yields ``(uint8 (B, 3, H, W), int64 (B,))`` in index order with ``world_size == 1``; with
    several ranks, rank ``r`` takes samples ``r, r + R, ...`` and every batch carries a third
    element, a bool ``(B,)`` validity mask (padding makes all ranks run ``len(self)`` steps).

    Args:
        split: the split to evaluate.
        batch_size: samples per batch (the last batch may be smaller).
        rank: this process's rank.
        world_size: number of ranks.
        device: where batches are delivered.
    """

    def __init__(
        self,
        split: ArraySplit,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.world_size = world_size
        self._idx, self._valid = eval_rank_indices(len(split), rank, world_size)

    def __len__(self) -> int:
        return -(-self._idx.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, self._idx.numel(), self.batch_size):
            idx = self._idx[start : start + self.batch_size]
            images, labels = self.split.take(idx, self.device)
            if self.world_size == 1:
                yield images, labels
            else:
                yield images, labels, to_device(self._valid[start : start + self.batch_size], self.device)
