"""Adaptive class weights for the aux head (paper Eq. 7-10)."""

from __future__ import annotations

import torch


def adaptive_weights(class_counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w_k = (min_j N_j / N_k) ** alpha``: the rarest class gets 1, frequent classes less.

    Args:
        class_counts: ``(C,)`` per-class counts (labeled counts ``N^L`` or the estimate ``N̂``);
            clamped to >= 1 so absent classes do not divide by zero.
        alpha: spread, >= 0; 0 gives all ones.

    Returns:
        float32 ``(C,)`` weights in ``(0, 1]``.
    """
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"adaptive_weights: class_counts must be a non-empty 1-D tensor, "
                         f"got shape {tuple(counts.shape)}")
    if not (alpha >= 0) or alpha == float("inf"):
        raise ValueError(f"adaptive_weights: alpha must be a finite number >= 0, got {alpha!r}")
    n = counts.to(torch.float64).clamp_min(1.0)
    return (n.min() / n).pow(alpha).to(torch.float32)


def annealed_weights(weights: torch.Tensor, progress: float | torch.Tensor) -> torch.Tensor:
    """Authors' optional schedule ``w' = 1 - progress * (1 - w)``, ``progress = t / T`` in [0, 1].

    ``progress`` may be a 0-d tensor on the weights' device (no host read: a CUDA graph can
    capture it); it is clamped to [0, 1] either way.
    """
    t = progress.clamp(0.0, 1.0) if isinstance(progress, torch.Tensor) else min(max(float(progress), 0.0), 1.0)
    return 1.0 - t * (1.0 - weights)
