"""The ``dali`` backend: ``fn.readers.webdataset`` over the same tar shards.

Decode runs in DALI: ``decoders.image(device="mixed")`` (nvJPEG) when ``device`` is CUDA, else
a CPU pipeline with ``device_id=None``. Sampling is DALI's own (the reader splits the split's
samples into ``world_size`` contiguous shards, one per rank, and shuffles within a buffer;
every rank's stream is infinite, so step counts are equal).

Class mixing comes from the data, not the buffer: the training splits are written in a seeded
shuffled order (docs/datasets.md, "Sample order"), so any run of consecutive samples -- a
rank's contiguous part, a buffer's worth -- is a uniform sample of the split. The shuffle buffer
(``initial_fill``) then only has to keep the same samples from meeting in the same batch every
epoch (DALI reads a rank's part in the same order each epoch): by default it holds
``max(1024, 4 * batch)`` samples, so each sample moves across several batch boundaries, at a
memory cost of that many *encoded* samples per stream (about 3 MB for 32 px PNGs, 110 MB for
full-resolution ImageNet JPEGs at 1024). Datasets built before the shuffled order are in class
order; a buffer would need most of the split to mix them, so the reader warns and names the
``bmb-shards`` command that rebuilds them.

The builder writes DALI's tar index files (``<split>-NNNNNN.idx``, ``wds2idx`` format) beside
the shards and the manifest lists them; they are passed as ``index_paths``, so a pipeline does
not parse every tar header when it starts. For older datasets without them DALI builds the
index itself in memory at start-up (nothing is written into the dataset directory). Resume uses DALI's pipeline
checkpointing (``enable_checkpointing``): the reader position is serialized into the state.
Orders therefore differ from the tensor/webdataset/ffcv backends (same samples, other order).

With ``views`` (config ``data.views=loader``; :mod:`pipelines.dali_views`) the same pipelines
also make the step's weak and strong views after decode and emit them normalised (float32
NCHW, on the GPU with ``mixed`` decode); the stream then yields
:class:`~pipelines.dali_views.ViewBatch` es and the trainer skips its ``ViewMaker``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorListGPU

from pipelines.base import Batch, ReaderSetup
from pipelines.sampling import check_rank, eval_rank_indices
from pipelines.shard_index import output_size, split_info, warn_if_class_sorted
from shards.format import dataset_file, load_manifest

MIN_SHUFFLE_BUFFER = 1024


def _paths(root: Path, manifest: dict[str, Any], split: str) -> list[str]:
    out = []
    for entry in split_info(root, manifest, split)["shards"]:
        p = dataset_file(root, entry["file"])
        if not p.is_file():
            raise ValueError(f"missing shard {p} (listed in manifest split {split!r})")
        out.append(str(p))
    return out


def _index_paths(root: Path, manifest: dict[str, Any], split: str) -> list[str]:
    """The shards' DALI index files, or ``[]`` (DALI indexes the tars itself) when any is
    missing (datasets built before the builder wrote them)."""
    out = []
    for entry in split_info(root, manifest, split)["shards"]:
        rec = entry.get("dali_index")
        if not rec or not dataset_file(root, rec["file"]).is_file():
            return []
        out.append(str(dataset_file(root, rec["file"])))
    return out


def shuffle_buffer_size(requested: int | None, batch: int, samples: int) -> int:
    """``initial_fill`` of a stream: ``requested``, or ``max(1024, 4 * batch)`` (see the module
    docstring), never more than the rank's ``samples``."""
    size = int(requested) if requested is not None else max(MIN_SHUFFLE_BUFFER, 4 * batch)
    if size < 1:
        raise ValueError(f"dali shuffle_buffer must be >= 1, got {requested}")
    return max(1, min(size, samples))


def _decode_ascii(batch: Any) -> torch.Tensor:
    # .cls/.idx are ASCII decimals of a few bytes: parsing B of them is negligible.
    return torch.tensor([int(bytes(np.asarray(s)).decode()) for s in batch], dtype=torch.int64)


def _to_torch(images: Any) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` from a DALI batch of ``(H, W, 3)`` images, in one bulk copy.

    A CPU batch is viewed as one dense numpy array (no copy) and copied once, straight into
    NCHW. A GPU batch (``mixed`` decode) stays on the GPU: DALI's PyTorch plugin copies it into
    a CUDA tensor on the current stream, which is then made NCHW there -- no host round trip.
    The result never aliases DALI's buffers, which the next ``run()`` reuses.
    """
    dense = images.as_tensor()  # (B, H, W, 3): every sample has the output size
    if isinstance(images, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        device = torch.device("cuda", torch.cuda.current_device())
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out.permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(np.asarray(dense)).permute(0, 3, 1, 2).contiguous()


def _pipe(
    paths: list[str],
    *,
    index_paths: list[str],
    batch_size: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    gpu: bool,
    fixed: bool,
    out_hw: tuple[int, int],
    num_threads: int,
    prefetch: int,
    buffer: int,
    checkpoint: str | None,
    pad: bool,
    views: Any = None,
    strong: bool = False,
    view_seed: int | None = None,
):
    """The reader + decode pipeline; with ``views`` (a :class:`~pipelines.dali_views.DaliViews`)
    it outputs the normalised views (``[weak]``, or ``[weak, strong...]`` with ``strong``)
    instead of the uint8 images, its random ops seeded by ``view_seed``."""

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=torch.cuda.current_device() if gpu else None,
        seed=seed if view_seed is None else view_seed,
        prefetch_queue_depth=prefetch,
        enable_checkpointing=True,
        checkpoint=checkpoint,
        enable_conditionals=views is not None,  # RandAugment splits the batch per op
    )
    def pipe():
        img, cls, idx = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["png;jpg;jpeg", "cls", "idx"],
            missing_component_behavior="error",
            random_shuffle=shuffle,
            initial_fill=buffer,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=pad,
            name="reader",
        )
        img = fn.decoders.image(img, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if not fixed:
            img = fn.resize(img, resize_shorter=out_hw[0])
            img = fn.crop(img, crop=out_hw)
        if views is not None:
            return (*views.make(img, out_hw, strong), cls, idx)
        return img, cls, idx

    p = pipe()
    p.build()
    return p


def _decode_on_gpu(decode_device: str | None, device: torch.device) -> bool:
    """Whether images decode on the GPU (``decode_device`` ``"mixed"``; default: on CUDA)."""
    return (decode_device or ("mixed" if device.type == "cuda" else "cpu")) == "mixed"


class DaliStream:
    """Infinite :class:`~pipelines.base.TrainStream` over the tar shards, decoded by DALI.

    Args:
        root, labeled_batch, unlabeled_batch, seed: as for :func:`pipelines.build_train_stream`.
        setup: placement and options; reads ``num_threads`` (DALI CPU threads per stream),
            ``load_size`` (output square size for variable-size JPEG datasets),
            ``decode_device`` (``"cpu"`` or ``"mixed"``; default: mixed on CUDA devices),
            ``prefetch`` (DALI prefetch queue depth), ``shuffle_buffer`` (reader shuffle buffer
            in samples; default ``max(1024, 4 * batch)`` capped at the rank's part of the split,
            see the module docstring) and ``views`` (a
            :class:`~pipelines.dali_views.DaliViews`, ``data.views=loader``: the pipelines emit
            the step's normalised views and the stream yields
            :class:`~pipelines.dali_views.ViewBatch` es; ``None``, the default: uint8 images).
    """

    def __init__(
        self, root: Path, setup: ReaderSetup, *, labeled_batch: int, unlabeled_batch: int, seed: int = 0
    ) -> None:
        rank, world_size, views = setup.rank, setup.world_size, setup.views
        check_rank(rank, world_size)
        root, self.device = Path(root), torch.device(setup.device)
        manifest = load_manifest(root)
        gpu = _decode_on_gpu(setup.decode_device, self.device)
        if gpu and not torch.cuda.is_available():
            raise ValueError("dali decode_device='mixed' needs a CUDA device")
        warn_if_class_sorted(root, manifest, "dali", ("labeled", "unlabeled"))
        self._cfg = {}
        self.views = views
        for part, (name, batch) in enumerate(
            (("labeled", labeled_batch), ("unlabeled", unlabeled_batch))
        ):
            per_rank = int(split_info(root, manifest, name)["count"]) // world_size
            self._cfg[name] = dict(
                paths=_paths(root, manifest, name),
                index_paths=_index_paths(root, manifest, name),
                batch_size=batch,
                seed=seed + (0 if name == "labeled" else 1),
                shard_id=rank,
                num_shards=world_size,
                shuffle=True,
                gpu=gpu,
                fixed=bool(manifest.get("image_size")),
                out_hw=output_size(manifest, setup.load_size),
                num_threads=setup.num_threads,
                prefetch=setup.prefetch,
                buffer=shuffle_buffer_size(setup.shuffle_buffer, batch, per_rank),
                pad=False,
            )
            if views is not None:
                # Augmentation randomness differs per rank and per split (the reader keeps its
                # own seed, so the sample order is the uint8 path's).
                state = np.random.SeedSequence([seed, rank, part, 17]).generate_state(1)
                self._cfg[name].update(
                    views=views, strong=name == "unlabeled", view_seed=int(state[0] >> 1)
                )
        self._pipes: dict[str, Any] = {}
        self._checkpoints: dict[str, str | None] = {"labeled": None, "unlabeled": None}

    def _get(self, name: str):
        if name not in self._pipes:
            self._pipes[name] = _pipe(**self._cfg[name], checkpoint=self._checkpoints[name])
        return self._pipes[name]

    def __iter__(self) -> Iterator[Batch]:
        lab, unl = self._get("labeled"), self._get("unlabeled")
        d = self.device
        if self.views is not None:
            yield from self._iter_views(lab, unl)  # infinite
            return
        while True:
            x_l, y_l, _ = lab.run()
            x_u, y_u, i_u = unl.run()
            yield Batch(
                _to_torch(x_l).to(d),
                _decode_ascii(y_l).to(d),
                _to_torch(x_u).to(d),
                _decode_ascii(i_u).to(d),
                _decode_ascii(y_u).to(d),
            )

    def _iter_views(self, lab: Any, unl: Any) -> Iterator[Batch]:
        from pipelines.dali_views import ViewBatch, float_to_torch, moved

        d = self.device
        while True:
            lw, y_l, _ = lab.run()
            *views, y_u, i_u = unl.run()
            lw = moved(float_to_torch(lw), d)
            uw, *strong = (moved(float_to_torch(v), d) for v in views)
            yield ViewBatch(
                lw,
                _decode_ascii(y_l).to(d),
                uw,
                _decode_ascii(i_u).to(d),
                _decode_ascii(y_u).to(d),
                views=(lw, uw, strong),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "dali", **{n: p.checkpoint() for n, p in self._pipes.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "dali":
            raise ValueError(f"reader state is from backend {state.get('backend')!r}, not 'dali'")
        self._checkpoints = {n: state.get(n) for n in ("labeled", "unlabeled")}
        self._pipes = {}


class DaliEval:
    """One in-order pass over a split (an :class:`~pipelines.base.EvalSource`); rank ``r``
    keeps samples ``r, r + R, ...`` and pads like :class:`~pipelines.tensor.TensorEval`."""

    def __init__(self, root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> None:
        root, self.device = Path(root), torch.device(setup.device)
        manifest = load_manifest(root)
        self.n = int(split_info(root, manifest, split)["count"])
        gpu = _decode_on_gpu(setup.decode_device, self.device)
        self._idx, self._valid = eval_rank_indices(self.n, setup.rank, setup.world_size)
        self.batch_size, self.world_size = batch_size, setup.world_size
        # The reader reads the whole split in order (cheap for eval sizes); each rank keeps its
        # strided part, so the rank split equals the other backends'.
        self._cfg = dict(
            paths=_paths(root, manifest, split),
            index_paths=_index_paths(root, manifest, split),
            batch_size=batch_size,
            seed=0,
            shard_id=0,
            num_shards=1,
            shuffle=False,
            gpu=gpu,
            fixed=bool(manifest.get("image_size")),
            out_hw=output_size(manifest, setup.load_size),
            num_threads=setup.num_threads,
            prefetch=2,
            buffer=1,
            checkpoint=None,
            pad=True,
        )

    def __len__(self) -> int:
        return -(-self._idx.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        p = _pipe(**self._cfg)
        total, real = self._idx.numel(), int(self._valid.sum())
        rank, world, bs = int(self._idx[0]) if total else 0, self.world_size, self.batch_size
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        have, emitted, read = 0, 0, 0
        first: tuple[torch.Tensor, torch.Tensor] | None = None
        while read < self.n:
            x, y, i = p.run()
            x, y, i = _to_torch(x), _decode_ascii(y), _decode_ascii(i)
            # pad_last_batch repeats the last sample to fill the final batch: drop those.
            keep = (i % world == rank) & (torch.arange(len(i)) + read < self.n)
            read += len(i)
            xs.append(x[keep.to(x.device)])
            ys.append(y[keep])
            have += int(keep.sum())
            while have >= bs or (read >= self.n and have > 0):
                xb, yb = torch.cat(xs), torch.cat(ys)
                b = min(bs, have)
                x, y = xb[:b], yb[:b]
                xs, ys, have = [xb[b:]], [yb[b:]], have - b
                if first is None:
                    first = (x[:1], y[:1])
                if emitted + b == real and total > real and b < bs:
                    # This rank has one sample fewer: pad its last batch (marked invalid).
                    x, y = torch.cat([x, first[0]]), torch.cat([y, first[1]])
                yield self._emit(x, y, emitted)
                emitted += len(y)
        if emitted < total and first is not None:
            yield self._emit(first[0], first[1], emitted)

    def _emit(self, x: torch.Tensor, y: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        valid = self._valid[start : start + len(y)]
        x, y = x.to(self.device), y.to(self.device)
        return (x, y) if self.world_size == 1 else (x, y, valid.to(self.device))


def build_train(root: Path, setup: ReaderSetup, **batches: Any) -> DaliStream:
    return DaliStream(root, setup, **batches)


def build_eval(root: Path, split: str, setup: ReaderSetup, *, batch_size: int) -> DaliEval:
    return DaliEval(root, split, setup, batch_size=batch_size)
