"""The paper's semi-supervised split rules, as pure functions of labels (no I/O).

Every function returns indices into the source's train set, in the order the samples are
written (their stable index within the split is their position in the returned array).
"""

from __future__ import annotations

import math
import random

import numpy as np

# How the unlabeled set relates to the labeled one (manifest ``split_rule.overlap``).
INCLUDES = "unlabeled_includes_labeled"  # the authors' rule (BMB; the FixMatch loaders of DARP/ABC/CoSSL)
DISJOINT = "disjoint"  # labeled and unlabeled images never shared (this project's old default)
OVERLAPS = (INCLUDES, DISJOINT)
DEFAULT_OVERLAP = INCLUDES


def overlap_record(overlap: str) -> dict[str, str]:
    """The ``split_rule`` entry of a CIFAR/subset/demo build: absent for ``disjoint``, so such a
    build's bytes equal those of builds made before the key existed."""
    return {} if overlap == DISJOINT else {"overlap": overlap}


def lt_counts(n_max: int, gamma: float, num_classes: int) -> list[int]:
    """Per-class sizes of an exponentially long-tailed split (DARP/CoSSL ``make_imb_data``).

    ``mu = (1/gamma)^(1/(C-1))`` in float64, ``n_k = floor(n_max * mu^(k-1))`` for k = 1..C-1
    and exactly ``floor(n_max / gamma)`` for the last class -- the integer truncation of the
    reference code, which the paper's numbers depend on.

    Args:
        n_max: size of the head class (N1 or M1).
        gamma: imbalance ratio head/tail (>= 1).
        num_classes: C.

    Returns:
        C non-increasing counts.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if gamma < 1:
        raise ValueError(f"imbalance ratio gamma must be >= 1, got {gamma}")
    if n_max < 0:
        raise ValueError(f"head-class size must be >= 0, got {n_max}")
    if num_classes == 1:
        return [int(n_max / gamma)]
    mu = np.power(1.0 / gamma, 1.0 / (num_classes - 1))
    counts = [int(n_max * np.power(mu, i)) for i in range(num_classes - 1)]
    counts.append(int(n_max / gamma))
    return counts


def lt_split(
    labels: np.ndarray,
    num_classes: int,
    n1: int,
    m1: int,
    gamma_l: float,
    gamma_u: float,
    seed: int,
    overlap: str = DEFAULT_OVERLAP,
) -> tuple[np.ndarray, np.ndarray]:
    """The long-tailed labeled/unlabeled subsets (paper 5.1) under one of :data:`OVERLAPS`.

    ``n_k``, ``m_k`` are :func:`lt_counts` of ``(n1, gamma_l)`` and ``(m1, gamma_u)``. For each
    class k in label order, its indices in source order ``idx``:

    * ``INCLUDES``, the authors' ``train_split_labeled_unlabeled`` (``BMB/dataset/utils.py``):
      ``idx`` is shuffled in place only when ``seed != 0``, with the global NumPy stream seeded
      once by ``np.random.seed(seed)`` just before the split -- one ``RandomState(seed)`` stream
      over the classes; labeled = ``idx[:n_k]``, unlabeled = ``idx[:n_k + m_k]`` (so every
      labeled image is also unlabeled).
    * ``DISJOINT`` (this tool's rule before 2026-12-08): ``idx`` is shuffled by that stream at
      every seed; labeled = ``idx[:n_k]``, unlabeled = ``idx[n_k:n_k + m_k]``.

    Returns:
        ``(labeled_idx, unlabeled_idx)``, int64, grouped by class in label order, each class in
        its (shuffled) order: under ``INCLUDES`` the authors' index lists exactly.

    Raises:
        ValueError: an unknown ``overlap``, or a class with fewer than ``n_k + m_k`` images.
    """
    if overlap not in OVERLAPS:
        raise ValueError(f"split rule must be one of {OVERLAPS}, got {overlap!r}")
    labels = np.asarray(labels)
    n = lt_counts(n1, gamma_l, num_classes)
    m = lt_counts(m1, gamma_u, num_classes)
    rng = np.random.RandomState(seed)
    lab: list[np.ndarray] = []
    unl: list[np.ndarray] = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if len(idx) < n[k] + m[k]:
            raise ValueError(
                f"class {k} has {len(idx)} train images, fewer than the {n[k]} labeled + "
                f"{m[k]} unlabeled the split asks for (lower --n1/--m1 or raise --gamma-*)"
            )
        if overlap == DISJOINT or seed != 0:
            rng.shuffle(idx)
        lab.append(idx[: n[k]])
        unl.append(idx[: n[k] + m[k]] if overlap == INCLUDES else idx[n[k] : n[k] + m[k]])
    return _cat(lab), _cat(unl)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


ROUNDINGS = ("floor", "ceil", "around")


def prefix_counts(totals: list[int] | np.ndarray, fraction: float, rounding: str) -> list[int]:
    """Per-class labeled sizes ``p*n_k`` rounded as one of the authors' files does.

    ``floor``: ``int(n*p)`` (their full-resolution ImageNet127 lists, ``generate_train_split.py``);
    ``ceil``: ``math.ceil(n*p)`` (ImageNet-LT); ``around``: ``int(np.around(n*p))``, NumPy's
    round-half-to-even (their Imagenet32/64 loader ``small_imagenet127.py``, as CoSSL's). The
    product is computed in float64 like their Python, so e.g. ``0.1*1300`` floors to 130.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
    if rounding == "floor":
        return [int(int(t) * fraction) for t in totals]
    if rounding == "ceil":
        return [math.ceil(int(t) * fraction) for t in totals]
    if rounding == "around":
        return [int(np.around(int(t) * fraction)) for t in totals]
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def sample_per_class(groups: list[list[int]], counts: list[int], seed: int) -> list[int]:
    """``random.sample`` of ``counts[k]`` items of each ``groups[k]``, classes in order.

    The authors' ImageNet127 rule (``generate_train_split.py``): one Python ``random`` stream
    seeded once (they use 2023), ``random.sample(class_list, n_k)`` for each class in label
    order; the sampled items keep the order ``random.sample`` returns them in.
    """
    rng = random.Random(seed)
    out: list[int] = []
    for k, (g, c) in enumerate(zip(groups, counts)):
        if len(g) < c:
            raise ValueError(f"class {k} has {len(g)} images, fewer than the {c} requested")
        out.extend(rng.sample(list(g), c))
    return out


def first_per_class(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[k]`` samples of each class k, in source order.

    Args:
        labels: int ``(N,)`` labels in source order.
        counts: per-class number to take.

    Returns:
        int64 indices, sorted ascending (source order), so labeled images keep their relative
        order in the source -- the authors' lists are per-class prefixes in list order.
    """
    labels = np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for k, c in enumerate(counts):
        idx = np.flatnonzero(labels == k)
        if len(idx) < c:
            raise ValueError(f"class {k} has {len(idx)} images, fewer than the {c} requested")
        keep[idx[:c]] = True
    return np.flatnonzero(keep).astype(np.int64)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Histogram of ``labels`` over ``0..num_classes-1`` as a list of Python ints."""
    return [int(c) for c in np.bincount(np.asarray(labels, np.int64), minlength=num_classes)]
