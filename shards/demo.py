"""The embedded demo source: procedural, long-tailed, 10-class, 32x32 RGB, made on the fly.

``bmb-shards demo --out DIR`` writes it as a dataset directory like any other source.

Each class is a family of textures: concentric rings whose radial frequency and ring profile
are class-specific, drawn around a random centre with a random phase, tint, contrast and noise.
Class frequencies are spaced so that neighbouring classes overlap a little: a classifier trained
on long-tailed data then confuses rare classes with their frequent neighbours -- the failure that
BMB is meant to fix -- while a balanced classifier can separate them. The patterns survive the
weak and strong augmentations (flips and translations keep rings rings).

Splits follow the CIFAR-LT rule (docs/datasets.md): ``n_k = floor(n1 * mu_l^k)`` labeled and
``m_k = floor(m1 * mu_u^k)`` unlabeled images for class ``k``, last class exactly
``floor(n1 / gamma_l)``; the test set is balanced. Under the authors' split rule (the default)
the unlabeled set of class ``k`` is its ``n_k`` labeled images followed by its ``m_k`` others;
``overlap="disjoint"`` keeps only the ``m_k`` others. Both draw the same images.
"""

from __future__ import annotations

import math

import numpy as np

from shards.splits import DEFAULT_OVERLAP, INCLUDES, OVERLAPS

JITTER = 0.09  # log-std of the per-sample ring frequency: how much neighbouring classes overlap
CLASS_NAMES = ("ring-a", "ring-b", "ring-c", "ring-d", "ring-e", "ring-f", "ring-g", "ring-h", "ring-i", "ring-j")


def long_tail_counts(largest: int, gamma: float, num_classes: int) -> list[int]:
    """Per-class counts ``floor(largest * mu^k)``, ``mu = gamma^(-1/(C-1))``, last class ``floor(largest/gamma)``."""
    mu = (1.0 / gamma) ** (1.0 / (num_classes - 1))
    counts = [math.floor(largest * mu**k) for k in range(num_classes - 1)]
    return counts + [math.floor(largest / gamma)]


def class_names(num_classes: int) -> list[str]:
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"ring-{i}" for i in range(num_classes)]


def render(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Images for ``labels`` ``(N,)``: uint8 ``(N, size, size, 3)``."""
    n = labels.shape[0]
    # Radial frequency (cycles across the image) grows geometrically with the class index; the
    # per-sample jitter makes neighbouring classes overlap.
    freq = 1.6 * 1.18 ** labels.astype(np.float64) * np.exp(JITTER * rng.standard_normal(n))
    # Ring profile: odd classes square-ish waves, even classes sine waves (a second, weaker cue).
    sharp = np.where(labels % 2 == 1, 4.0, 1.0)
    cy, cx = (rng.random(n) - 0.5) * 0.5, (rng.random(n) - 0.5) * 0.5
    phase = rng.random(n) * 2 * math.pi
    ax = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    r = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)  # (N, S, S)
    wave = np.tanh(sharp[:, None, None] * np.sin(math.pi * freq[:, None, None] * r + phase[:, None, None]))
    wave = wave / np.tanh(sharp)[:, None, None]
    # Tint: a random colour pair per sample (colour carries no class information).
    fg = rng.random((n, 3)) * 0.6 + 0.4
    bg = rng.random((n, 3)) * 0.4
    contrast = rng.random(n) * 0.5 + 0.5
    mix = (0.5 + 0.5 * contrast[:, None, None] * wave)[..., None]  # (N, S, S, 1)
    img = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * mix
    img = img + 0.06 * rng.standard_normal((n, size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_demo(num_classes: int = 10, n1: int = 200, m1: int = 800, gamma_l: float = 100.0,
              gamma_u: float = 100.0, test_per_class: int = 100, seed: int = 0, size: int = 32,
              overlap: str = DEFAULT_OVERLAP) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The demo splits ``labeled``, ``unlabeled`` (long-tailed) and ``test`` (balanced).

    ``overlap``: :data:`shards.splits.INCLUDES` (unlabeled = per class the labeled images, then
    ``m_k`` more) or ``shards.splits.DISJOINT`` (only the ``m_k`` more).

    Returns:
        split name -> ``(images uint8 (N, size, size, 3), labels int64 (N,))``.
    """
    if num_classes < 2:
        raise ValueError(f"demo: num_classes must be >= 2, got {num_classes}")
    for name, value in (("n1", n1), ("m1", m1), ("test_per_class", test_per_class), ("size", size)):
        if value < 1:
            raise ValueError(f"demo: {name} must be >= 1, got {value}")
    for name, value in (("gamma_l", gamma_l), ("gamma_u", gamma_u)):
        if value < 1:
            raise ValueError(f"demo: {name} must be >= 1, got {value}")
    if overlap not in OVERLAPS:
        raise ValueError(f"demo: split rule must be one of {OVERLAPS}, got {overlap!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for split, counts in (("labeled", long_tail_counts(n1, gamma_l, num_classes)),
                          ("unlabeled", long_tail_counts(m1, gamma_u, num_classes)),
                          ("test", [test_per_class] * num_classes)):
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
        out[split] = (render(labels, rng, size), labels)
    if overlap == INCLUDES:
        out["unlabeled"] = _prepend_per_class(out["labeled"], out["unlabeled"], num_classes)
    return out


def _prepend_per_class(first: tuple[np.ndarray, np.ndarray], then: tuple[np.ndarray, np.ndarray],
                       num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class in label order: ``first``'s samples of the class, then ``then``'s."""
    rows = [(x[y == k], y[y == k]) for k in range(num_classes) for x, y in (first, then)]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
