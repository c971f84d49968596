"""Input pipelines: one interface (:mod:`pipelines.base`), several backends.

The trainer calls :func:`build_train_stream` and :func:`build_eval_source` with a backend name
chosen by config:

========== ============================================================================
tensor     uint8 arrays in host or device memory (``--formats arrays``); fastest at 32/64 px
webdataset the tar shards (always written); decode in DataLoader workers; portable default
ffcv       the ``.beton`` files (``--formats ffcv``); ``pip install bmb[ffcv]``
dali       the tar shards via ``fn.readers.webdataset``; GPU decode; ``pip install bmb[dali]``
========== ============================================================================

Every backend reads its placement (rank, world size, device) and options from one
:class:`~pipelines.base.ReaderSetup`: built from the run config by :func:`reader_setup`, or from
the keyword options of the two builders; its fields say which backend reads each.

Before a backend is built, the labels it will read are re-counted against the manifest's
per-class counts (:mod:`pipelines.checks`); a changed split stops the run at start.

Backend modules are imported lazily so a missing optional package only matters when that
backend is asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pipelines.base import Batch, EvalSource, ReaderSetup, TrainStream
from pipelines.decode import ON_CORRUPT, check_on_corrupt

__all__ = [
    "BACKENDS",
    "Batch",
    "EvalSource",
    "ON_CORRUPT",
    "ReaderSetup",
    "TrainStream",
    "build_eval_source",
    "build_train_stream",
    "corrupt_options",
    "reader_setup",
]

# name -> (module, pip extra or None when only core dependencies are needed)
_MODULES: dict[str, tuple[str, str | None]] = {
    "tensor": ("pipelines.tensor", None),
    "webdataset": ("pipelines.wds", None),
    "ffcv": ("pipelines.ffcv_backend", "ffcv"),
    "dali": ("pipelines.dali_backend", "dali"),
}
_ALIASES = {"wds": "webdataset"}
BACKENDS = tuple(_MODULES)

# The options every backend reads: pipelines.base.ReaderSetup (its fields say which backend
# reads which; anything else is a ValueError).


def _resolve(backend: str) -> str:
    name = _ALIASES.get(backend, backend)
    if name not in _MODULES:
        raise ValueError(f"unknown input backend {backend!r}; choose one of {list(BACKENDS)}")
    return name


def _module(name: str) -> Any:
    module, extra = _MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if extra is None:
            raise
        raise ImportError(
            f"input backend {name!r} needs an optional package that is not installed ({e}); "
            f"install it with `pip install bmb[{extra}]`"
        ) from e


def _tensor_splits(dataset: Any, names: tuple[str, ...], setup: ReaderSetup):
    from pipelines.tensor import ArraySplit, load_array_split

    out = []
    for split in names:
        if isinstance(dataset, dict):
            if split not in dataset:
                raise ValueError(
                    f"in-memory dataset has no split {split!r} (has {sorted(dataset)})"
                )
            s = dataset[split]
            if not isinstance(s, ArraySplit):
                raise ValueError(f"in-memory split {split!r} must be an ArraySplit, got {type(s)}")
        else:
            s = load_array_split(dataset, split, mmap=setup.mmap, max_pixels=setup.max_pixels)
        if setup.on_device:
            # Whole split on the training device: batches are then a device-side gather.
            s = ArraySplit(s.images.to(setup.device).contiguous(), s.labels.to(setup.device))
        out.append(s)
    return out


def _check_dataset(dataset: Any, name: str) -> Any:
    """The dataset as the backend takes it (a directory ``Path``, a URL string, a dict)."""
    from shards.format import is_url

    if is_url(dataset):  # read as a stream (pipelines.wds_stream)
        if name != "webdataset":
            raise ValueError(
                f"dataset {dataset} is a URL, which only backend 'webdataset' with "
                f"order='stream' reads (data.order=stream), not backend {name!r}"
            )
        return dataset
    if isinstance(dataset, dict):
        return dataset
    if not isinstance(dataset, (str, Path)):
        raise ValueError(
            f"dataset must be a directory path or a dict of ArraySplit, got {type(dataset)}"
        )
    if not (Path(dataset) / "manifest.json").is_file() and not Path(dataset).is_dir():
        raise ValueError(f"dataset directory {dataset} does not exist")
    return Path(dataset)


def _check_labels(dataset: Any, name: str, splits: tuple[str, ...], setup: ReaderSetup) -> None:
    """The start-of-run label check (:mod:`pipelines.checks`) for a dataset directory."""
    if isinstance(dataset, dict) or not (Path(dataset) / "manifest.json").is_file():
        return  # in-memory splits / bare arrays: no manifest to check against
    if name == "webdataset" and setup.order == "stream":
        return  # no up-front random access in that mode (see pipelines.checks)
    from pipelines.checks import check_labels

    check_labels(Path(dataset), name, splits)


def corrupt_options(backend: str, on_corrupt: str) -> dict[str, Any]:
    """Backend options for the run's corrupt-image policy (config ``data.on_corrupt``).

    ``"error"`` stops on the first undecodable image, naming shard and key; ``"skip"`` replaces
    it by a copy of a valid sample of the same batch (with that sample's label and index),
    logs it and counts it in the stream's ``skipped``. The ``webdataset`` readers (both
    orders) implement both; ``tensor`` decodes nothing (no option); ``ffcv`` and ``dali``
    decode inside their own libraries, which stop on a corrupt image, so ``"skip"`` is refused
    for them (check the shards first with ``bmb-shards verify --decode``).

    Raises:
        ValueError: unknown policy, or ``"skip"`` with ``ffcv``/``dali``.
    """
    name = _resolve(backend)
    check_on_corrupt(on_corrupt)
    if name == "webdataset":
        return {"on_corrupt": on_corrupt}
    if name in ("ffcv", "dali") and on_corrupt == "skip":
        raise ValueError(
            f"on_corrupt=skip is not supported by the {name!r} backend (it decodes inside "
            f"{name.upper()}, which stops on a corrupt image); use the webdataset backend, or "
            "find bad samples first with `bmb-shards verify --decode DIR`"
        )
    return {}


def reader_setup(cfg: Any, rank: int, world_size: int, device: Any) -> ReaderSetup:
    """The run's :class:`~pipelines.base.ReaderSetup` (training and evaluation alike), built
    from its config: ``cfg.data`` (backend, workers, order, shuffle_buffer, views, on_corrupt,
    crop, load_size, image_size, mean, std) and ``cfg.method.num_strong``.

    ``data.workers`` are the ``webdataset`` DataLoader workers, the ``ffcv`` decode threads and
    the ``dali`` CPU threads (at least 1); ``tensor`` holds the splits on the device when it is
    CUDA; ``load_size`` applies to the variable-size datasets of the decoding backends.

    Raises:
        ValueError: ``data.on_corrupt`` is not supported by the backend (message starts with
            ``data.on_corrupt:``), or an unknown backend.
    """
    import torch

    d = cfg.data
    name = _resolve(d.backend)
    options: dict[str, Any] = dict(rank=rank, world_size=world_size, device=device, max_pixels=d.max_pixels)
    if name == "tensor":
        options["on_device"] = torch.device(device).type == "cuda"
    elif name == "webdataset":
        options.update(num_workers=d.workers, order=d.order)
        if d.order == "stream":
            options["shuffle_buffer"] = d.shuffle_buffer
    elif name == "ffcv":
        options["num_workers"] = d.workers
    elif name == "dali":
        options["num_threads"] = max(d.workers, 1)
        if d.views == "loader":  # the pipeline makes the views (ViewMaker's settings)
            from pipelines.dali_views import DaliViews

            options["views"] = DaliViews(**DaliViews.config_kwargs(cfg))
    try:
        options.update(corrupt_options(name, d.on_corrupt))
    except ValueError as e:
        raise ValueError(f"data.on_corrupt: {e}") from e
    if name != "tensor":  # variable-size datasets only (a fixed image size wins)
        options["load_size"] = d.load_size
        if d.view_rule == "authors_imagenet":  # the reader cuts every view's crop
            from pipelines.imagenet_views import ImageNetViews

            options["imagenet_views"] = ImageNetViews(resize=d.load_size, crop=d.image_size, seed=cfg.train.seed)
            options["num_strong"] = cfg.method.num_strong
    return ReaderSetup(**options)


def _setup(name: str, kind: str, setup: ReaderSetup | None, options: dict[str, Any]) -> ReaderSetup:
    if setup is None:
        return ReaderSetup.from_options(name, kind, options)
    if options:
        raise ValueError(f"pass either setup or options, not both (got {sorted(options)})")
    return setup


def _prepare(
    backend: str, dataset: Any, splits: tuple[str, ...], kind: str, setup: ReaderSetup | None,
    options: dict[str, Any],
) -> tuple[str, ReaderSetup, Any]:
    """The backend's name, its setup and the dataset as it takes it (a directory ``Path``, a URL
    string, a dict of in-memory splits), once the options, the dataset and its labels check out."""
    name = _resolve(backend)
    setup = _setup(name, kind, setup, options)
    dataset = _check_dataset(dataset, name)
    _check_labels(dataset, name, splits, setup)
    if name != "tensor" and isinstance(dataset, dict):
        raise ValueError(f"backend {name!r} reads a dataset directory, not in-memory splits")
    return name, setup, dataset


def _build(name: str, kind: str, root: Any, args: tuple, setup: ReaderSetup, **sizes: Any) -> Any:
    factory = getattr(_module(name), f"build_{kind}")
    if name == "webdataset":  # pipelines.wds makes its ReaderSetup of the fields it reads
        return factory(root, *args, **sizes, **setup.options(name, kind))
    return factory(root, *args, setup, **sizes)


def build_train_stream(
    backend: str,
    dataset: str | Path | dict[str, Any],
    *,
    labeled_batch: int,
    unlabeled_batch: int,
    seed: int = 0,
    setup: ReaderSetup | None = None,
    **options: Any,
) -> TrainStream:
    """Build the infinite training stream of one rank.

    Args:
        backend: ``"tensor"``, ``"webdataset"`` (alias ``"wds"``), ``"ffcv"`` or ``"dali"``.
        dataset: dataset directory (with ``manifest.json``), or for ``tensor`` a dict
            ``{"labeled": ArraySplit, "unlabeled": ArraySplit}``.
        labeled_batch: labeled samples per step ``B_L`` (per rank).
        unlabeled_batch: unlabeled samples per step ``B_U`` (per rank).
        seed: base seed of the sampling order.
        setup: where and how to deliver (:class:`~pipelines.base.ReaderSetup`, e.g. from
            :func:`reader_setup`); or, instead,
        **options: its fields as keyword options, e.g. ``rank=1, world_size=2,
            device="cuda", num_workers=4`` (every rank gets the same number of steps per
            epoch); a field the backend does not read is a ValueError.

    Returns:
        A :class:`~pipelines.base.TrainStream` yielding :class:`~pipelines.base.Batch`.

    Raises:
        ValueError: unknown backend or option, or a bad dataset -- including labels that do
            not match the manifest's per-class counts (:mod:`pipelines.checks`).
        ImportError: the backend's optional package is missing (names the pip extra).
    """
    name, setup, dataset = _prepare(backend, dataset, ("labeled", "unlabeled"), "train", setup, options)
    batches = dict(labeled_batch=labeled_batch, unlabeled_batch=unlabeled_batch, seed=seed)
    if name == "tensor":
        from pipelines.tensor import TensorStream

        lab, unl = _tensor_splits(dataset, ("labeled", "unlabeled"), setup)
        place = dict(rank=setup.rank, world_size=setup.world_size, device=setup.device)
        return TensorStream(lab, unl, **batches, **place)
    return _build(name, "train", dataset, (), setup, **batches)


def build_eval_source(
    backend: str,
    dataset: str | Path | dict[str, Any],
    split: str,
    *,
    batch_size: int,
    setup: ReaderSetup | None = None,
    **options: Any,
) -> EvalSource:
    """Build one rank's finite pass over ``split`` (e.g. ``"test"``).

    Batches are ``(uint8 (B, 3, H, W), int64 (B,))``; with ``world_size > 1`` each also carries a
    bool ``(B,)`` validity mask (padding equalises the step count across ranks).

    Args:
        backend: as for :func:`build_train_stream`.
        dataset: dataset directory, or for ``tensor`` a dict of :class:`ArraySplit`.
        split: split name.
        batch_size: samples per batch.
        setup, **options: as for :func:`build_train_stream` (a training setup serves: the
            training-only fields are not read).
    """
    name, setup, dataset = _prepare(backend, dataset, (split,), "eval", setup, options)
    if name == "tensor":
        from pipelines.tensor import TensorEval

        (s,) = _tensor_splits(dataset, (split,), setup)
        place = dict(rank=setup.rank, world_size=setup.world_size, device=setup.device)
        return TensorEval(s, batch_size=batch_size, **place)
    return _build(name, "eval", dataset, (split,), setup, batch_size=batch_size)
