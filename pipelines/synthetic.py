"""The embedded demo dataset: procedural, long-tailed, 10-class, 32x32 RGB, made on the fly.

Each class is a family of textures: concentric rings whose radial frequency and ring profile
are class-specific, drawn around a random centre with a random phase, tint, contrast and noise.
Class frequencies are spaced so that neighbouring classes overlap a little: a classifier trained
on long-tailed data then confuses rare classes with their frequent neighbours -- the failure that
BMB is meant to fix -- while a balanced classifier can separate them. The patterns survive the
weak and strong augmentations (flips and translations keep rings rings).

Splits follow the CIFAR-LT rule (docs/datasets.md): ``n_k = floor(n1 * mu_l^k)`` labeled and
``m_k = floor(m1 * mu_u^k)`` unlabeled images for class ``k``, last class exactly
``floor(n1 / gamma_l)``; the test set is balanced.
"""

from __future__ import annotations

import math

import torch

from pipelines.tensor import ArraySplit

CLASS_NAMES = ("ring-a", "ring-b", "ring-c", "ring-d", "ring-e", "ring-f", "ring-g", "ring-h", "ring-i", "ring-j")


def long_tail_counts(largest: int, gamma: float, num_classes: int) -> list[int]:
    """Per-class counts ``floor(largest * mu^k)``, ``mu = gamma^(-1/(C-1))``, last class ``floor(largest/gamma)``."""
    mu = (1.0 / gamma) ** (1.0 / (num_classes - 1))
    counts = [math.floor(largest * mu**k) for k in range(num_classes - 1)]
    return counts + [math.floor(largest / gamma)]


def render(labels: torch.Tensor, generator: torch.Generator, size: int = 32, num_classes: int = 10) -> torch.Tensor:
    """Images for ``labels`` ``(N,)``: uint8 ``(N, 3, size, size)``."""
    n = labels.shape[0]
    g = generator

    def u(*shape):
        return torch.rand(*shape, generator=g)

    # Radial frequency (cycles across the image) grows geometrically with the class index; the
    # per-sample jitter makes neighbouring classes overlap.
    base = 1.6 * (1.18 ** labels.double())
    freq = base * torch.exp(0.07 * torch.randn(n, generator=g, dtype=torch.float64))
    # Ring profile: odd classes square-ish waves, even classes sine waves (a second, weaker cue).
    sharp = torch.where(labels % 2 == 1, 4.0, 1.0).double()
    cy, cx = (u(n).double() - 0.5) * 0.5, (u(n).double() - 0.5) * 0.5
    phase = u(n).double() * 2 * math.pi
    ax = torch.linspace(-1, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    r = torch.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)  # (N, S, S)
    wave = torch.tanh(sharp[:, None, None] * torch.sin(math.pi * freq[:, None, None] * r + phase[:, None, None]))
    wave = wave / torch.tanh(sharp)[:, None, None]
    # Tint: a random colour pair per sample (colour carries no class information).
    fg = u(n, 3).double() * 0.6 + 0.4
    bg = u(n, 3).double() * 0.4
    contrast = u(n).double() * 0.5 + 0.5
    mix = (0.5 + 0.5 * contrast[:, None, None] * wave)[:, None]  # (N, 1, S, S)
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * mix
    img = img + 0.06 * torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_demo(num_classes: int = 10, n1: int = 200, m1: int = 800, gamma_l: float = 20.0,
              gamma_u: float = 20.0, test_per_class: int = 100, seed: int = 0, size: int = 32
              ) -> dict[str, ArraySplit]:
    """The demo splits ``labeled``, ``unlabeled`` (long-tailed) and ``test`` (balanced)."""
    if num_classes < 2:
        raise ValueError(f"make_demo: num_classes must be >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, counts in (("labeled", long_tail_counts(n1, gamma_l, num_classes)),
                         ("unlabeled", long_tail_counts(m1, gamma_u, num_classes)),
                         ("test", [test_per_class] * num_classes)):
        labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
        out[name] = ArraySplit(render(labels, g, size, num_classes), labels)
    return out
