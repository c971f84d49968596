"""Input pipelines: one interface (:mod:`pipelines.base`), several backends.

The trainer calls :func:`build_train_stream` and :func:`build_eval_source` with a backend name
chosen by config:

========== ============================================================================
tensor     uint8 arrays in host or device memory (``--formats arrays``); fastest at 32/64 px
webdataset the tar shards (always written); decode in DataLoader workers; portable default
ffcv       the ``.beton`` files (``--formats ffcv``); ``pip install bmb[ffcv]``
dali       the tar shards via ``fn.readers.webdataset``; GPU decode; ``pip install bmb[dali]``
========== ============================================================================

Before a backend is built, the labels it will read are re-counted against the manifest's
per-class counts (:mod:`pipelines.checks`); a changed split stops the run at start.

Backend modules are imported lazily so a missing optional package only matters when that
backend is asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from pipelines.base import Batch, EvalSource, TrainStream

__all__ = [
    "BACKENDS",
    "Batch",
    "EvalSource",
    "ON_CORRUPT",
    "TrainStream",
    "build_eval_source",
    "build_train_stream",
    "corrupt_options",
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

# Options each backend accepts (beyond the common arguments); anything else is a ValueError.
_TRAIN_OPTIONS: dict[str, frozenset[str]] = {
    "tensor": frozenset({"mmap", "on_device"}),
    "webdataset": frozenset(
        {
            "num_workers",
            "prefetch_factor",
            "pin_memory",
            "load_size",
            "on_corrupt",
            "order",  # "index" (seek per sample, default) or "stream" (sequential shards)
            "shuffle_buffer",  # order="stream" only
        }
    ),
    "ffcv": frozenset({"num_workers", "order", "os_cache", "load_size"}),
    "dali": frozenset(
        {"num_threads", "load_size", "decode_device", "prefetch", "shuffle_buffer", "views"}
    ),  # views: data.views=loader (pipelines.dali_views.DaliViews)
}
_EVAL_OPTIONS: dict[str, frozenset[str]] = {
    "tensor": frozenset({"mmap", "on_device"}),
    "webdataset": frozenset(
        {"num_workers", "prefetch_factor", "pin_memory", "load_size", "on_corrupt"}
    ),
    "ffcv": frozenset({"num_workers", "os_cache", "load_size"}),
    "dali": frozenset({"num_threads", "load_size", "decode_device"}),
}


def _resolve(backend: str) -> str:
    name = _ALIASES.get(backend, backend)
    if name not in _MODULES:
        raise ValueError(f"unknown input backend {backend!r}; choose one of {list(BACKENDS)}")
    return name


def _check_options(name: str, options: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for input backend {name!r}; allowed: {sorted(allowed)}"
        )


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


def _tensor_splits(dataset: Any, names: tuple[str, ...], options: dict[str, Any], device: Any):
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
            s = load_array_split(dataset, split, mmap=options.get("mmap", True))
        if options.get("on_device", False):
            # Whole split on the training device: batches are then a device-side gather.
            s = ArraySplit(s.images.to(device).contiguous(), s.labels.to(device))
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


def _check_labels(
    dataset: Any, name: str, splits: tuple[str, ...], options: dict[str, Any]
) -> None:
    """The start-of-run label check (:mod:`pipelines.checks`) for a dataset directory."""
    if isinstance(dataset, dict) or not (Path(dataset) / "manifest.json").is_file():
        return  # in-memory splits / bare arrays: no manifest to check against
    if name == "webdataset" and options.get("order") == "stream":
        return  # no up-front random access in that mode (see pipelines.checks)
    from pipelines.checks import check_labels

    check_labels(Path(dataset), name, splits)


ON_CORRUPT = ("error", "skip")


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
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    if name == "webdataset":
        return {"on_corrupt": "raise" if on_corrupt == "error" else "skip"}
    if name in ("ffcv", "dali") and on_corrupt == "skip":
        raise ValueError(
            f"on_corrupt=skip is not supported by the {name!r} backend (it decodes inside "
            f"{name.upper()}, which stops on a corrupt image); use the webdataset backend, or "
            "find bad samples first with `bmb-shards verify --decode DIR`"
        )
    return {}


def build_train_stream(
    backend: str,
    dataset: str | Path | dict[str, Any],
    *,
    labeled_batch: int,
    unlabeled_batch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
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
        rank: this process's rank.
        world_size: number of ranks; every rank gets the same number of steps per epoch.
        device: where batches are delivered.
        **options: backend options (see ``_TRAIN_OPTIONS``), e.g. ``num_workers=4``.

    Returns:
        A :class:`~pipelines.base.TrainStream` yielding :class:`~pipelines.base.Batch`.

    Raises:
        ValueError: unknown backend or option, or a bad dataset -- including labels that do
            not match the manifest's per-class counts (:mod:`pipelines.checks`).
        ImportError: the backend's optional package is missing (names the pip extra).
    """
    name = _resolve(backend)
    _check_options(name, options, _TRAIN_OPTIONS[name])
    dataset = _check_dataset(dataset, name)
    _check_labels(dataset, name, ("labeled", "unlabeled"), options)
    common = dict(
        labeled_batch=labeled_batch,
        unlabeled_batch=unlabeled_batch,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=device,
    )
    if name == "tensor":
        from pipelines.tensor import TensorStream

        lab, unl = _tensor_splits(dataset, ("labeled", "unlabeled"), options, device)
        return TensorStream(lab, unl, **common)
    if isinstance(dataset, dict):
        raise ValueError(f"backend {name!r} reads a dataset directory, not in-memory splits")
    return _module(name).build_train(dataset, **common, **options)


def build_eval_source(
    backend: str,
    dataset: str | Path | dict[str, Any],
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
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
        rank: this process's rank.
        world_size: number of ranks.
        device: where batches are delivered.
        **options: backend options (see ``_EVAL_OPTIONS``).
    """
    name = _resolve(backend)
    _check_options(name, options, _EVAL_OPTIONS[name])
    dataset = _check_dataset(dataset, name)
    _check_labels(dataset, name, (split,), options)
    if name == "tensor":
        from pipelines.tensor import TensorEval

        (s,) = _tensor_splits(dataset, (split,), options, device)
        return TensorEval(s, batch_size=batch_size, rank=rank, world_size=world_size, device=device)
    if isinstance(dataset, dict):
        raise ValueError(f"backend {name!r} reads a dataset directory, not in-memory splits")
    return _module(name).build_eval(
        dataset,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        **options,
    )
