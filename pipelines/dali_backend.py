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

Bad images. Each image's header is read before it is decoded (``fn.peek_image_shape``): one
declaring more than ``max_pixels`` pixels (``data.max_pixels``), or, in a fixed-size dataset,
another size, is not decoded (a placeholder takes its place) and the batch is refused with a
:class:`~shards.format.DataError` naming the shard and key. An image DALI cannot parse or
decode stops the pipeline; the error is re-raised as a ``DataError`` naming the split and the
first image of it that :func:`shards.format.decode_image` refuses (shard and key), found by a
bounded scan of the split.

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
from pipelines.decode import output_size
from pipelines.sampling import check_rank, eval_rank_indices
from pipelines.shard_index import first_undecodable, sample_location, split_info, warn_if_class_sorted
from shards.format import MAX_PIXELS, DataError, dataset_file, load_manifest

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
    cut: Any = None,
    max_pixels: int = MAX_PIXELS,
):
    """The reader + decode pipeline; with ``views`` (a :class:`~pipelines.dali_views.DaliViews`)
    it outputs the normalised views (``[weak]``, or ``[weak, strong...]`` with ``strong``)
    instead of the uint8 images, its random ops seeded by ``view_seed``. Its last output is
    each image's header shape (int64 ``(3,)``), checked by :func:`_run`."""

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=torch.cuda.current_device() if gpu else None,
        seed=seed if view_seed is None else view_seed,
        prefetch_queue_depth=prefetch,
        enable_checkpointing=True,
        checkpoint=checkpoint,
        enable_conditionals=True,  # the header check (and RandAugment) split the batch
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
        img, shape = _checked_decode(img, gpu=gpu, fixed=fixed, out_hw=out_hw, max_pixels=max_pixels)
        if cut is not None:  # data.view_rule=authors_imagenet: every view's crop cut here
            from pipelines.dali_views import cut_views

            img = cut_views(img, _placeholder_shape(shape, out_hw, max_pixels), cut)
        elif not fixed:
            img = fn.resize(img, resize_shorter=out_hw[0])
            img = fn.crop(img, crop=out_hw)
        if views is not None:
            return (*views.make(img, out_hw, strong), cls, idx, shape)
        return img, cls, idx, shape

    p = pipe()
    p.build()
    return p


def _placeholder_shape(shape: Any, out_hw: tuple[int, int], max_pixels: int) -> Any:
    """The shape that :func:`pipelines.dali_views.cut_views` sizes a view from: the header's, or
    for an image :func:`_checked_decode` refused, the placeholder's (never a refused image's
    declared size, which could ask for a huge resize); such a batch is refused by :func:`_run`."""
    ok = fn.cast(shape[0] * shape[1] <= max_pixels, dtype=types.INT64)
    hw = fn.stack(shape[0] * ok + out_hw[0] * (1 - ok), shape[1] * ok + out_hw[1] * (1 - ok))
    return fn.cat(hw, fn.cast(shape[2:3], dtype=types.INT64))


def _checked_decode(img: Any, *, gpu: bool, fixed: bool, out_hw: tuple[int, int], max_pixels: int):
    """Decode the images whose header passes (at most ``max_pixels`` pixels; ``out_hw`` where
    ``fixed``); the others become a black placeholder, to be refused by :func:`_run`.
    Returns ``(images, header shapes)``."""
    shape = fn.peek_image_shape(img, dtype=types.INT64)  # (H, W, C), from the header only
    ok = shape[0] * shape[1] <= max_pixels
    if fixed:
        ok = ok & (shape[0] == out_hw[0]) & (shape[1] == out_hw[1])
    if ok:
        out = fn.decoders.image(img, device="mixed" if gpu else "cpu", output_type=types.RGB)
    else:
        out = fn.reshape(fn.zeros(shape=[out_hw[0], out_hw[1], 3], dtype=types.UINT8), layout="HWC")
        if gpu:
            out = out.gpu()
    return out, shape


class _Where:
    """Names samples of one split for :func:`_run`'s errors (computed only on an error)."""

    def __init__(self, root: Path, manifest: dict[str, Any], split: str, max_pixels: int):
        self.root, self.manifest, self.split, self.max_pixels = root, manifest, split, max_pixels
        size = manifest.get("image_size")
        self.size = (int(size[0]), int(size[1])) if size else None

    def check(self, shapes: np.ndarray, idx: torch.Tensor) -> None:
        """Raise a DataError for the first image whose header ``shapes[j]`` was refused."""
        h, w = shapes[:, 0], shapes[:, 1]
        bad = h * w > self.max_pixels
        if self.size is not None:
            bad |= (h != self.size[0]) | (w != self.size[1])
        if not bad.any():
            return
        j = int(np.nonzero(bad)[0][0])
        where = sample_location(self.root, self.manifest, self.split, int(idx[j]))
        why = f"over the limit of {self.max_pixels} pixels (data.max_pixels); not decoded"
        if h[j] * w[j] <= self.max_pixels:
            why = f"the dataset says {self.size[0]}x{self.size[1]}"
        raise DataError(f"{where}: image is {h[j]}x{w[j]}, {why}")

    def failed(self, e: Exception) -> DataError:
        """The DataError for DALI's own error ``e`` (an image it could not parse or decode)."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "failure" in ln), None) or next(
            (ln for ln in reversed(lines) if "no longer valid" not in ln), "unknown error"
        )
        found = first_undecodable(self.root, self.manifest, self.split, self.max_pixels)
        where = found or (
            f"{self.root}: split {self.split!r} (the image was not found within the search "
            f"budget: run `bmb-shards verify --decode {self.root}`)"
        )
        return DataError(f"dali could not decode an image ({reason}); {where}")


def _run(p: Any, where: _Where) -> tuple[Any, ...]:
    """``p.run()`` without its last output (the header shapes), which is checked: bad images
    and DALI's own decode errors become a :class:`~shards.format.DataError` naming shard and
    key."""
    try:
        *out, shape = p.run()
    except RuntimeError as e:
        raise where.failed(e) from None
    shapes = np.asarray(shape.as_tensor()).reshape(-1, 3)
    where.check(shapes, _decode_ascii(out[-1]))
    return tuple(out)


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
                cut=setup.stream_views(manifest, name),
                max_pixels=setup.max_pixels,
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
        self._where = {n: _Where(root, manifest, n, setup.max_pixels) for n in self._cfg}

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
            x_l, y_l, _ = _run(lab, self._where["labeled"])
            x_u, y_u, i_u = _run(unl, self._where["unlabeled"])
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
            lw, y_l, _ = _run(lab, self._where["labeled"])
            *views, y_u, i_u = _run(unl, self._where["unlabeled"])
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
            cut=setup.stream_views(manifest, "eval"),
            max_pixels=setup.max_pixels,
        )
        self._where = _Where(root, manifest, split, setup.max_pixels)

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
            x, y, i = _run(p, self._where)
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
