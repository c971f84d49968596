"""The BMB network: one shared encoder and two linear heads on its pooled feature.

The **base head** is trained exactly like FixMatch (no rebalancing) and exists to make the
encoder good; the **aux head** is the rebalanced classifier and the one used for predictions.

Speed options (``model.memory_format``, ``model.compile``; :meth:`BMBModel.configure`) change how
the same maths runs, never the parameters or their names: a checkpoint loads either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bmb.models.encoders import build_encoder

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

#: ``model.init``: ``ours`` (PyTorch's default heads; ResNet-50's last BN of each block at
#: gamma 0) or ``authors`` (their ``model/*withABC.py``: xavier_normal_ heads with zero bias,
#: every BN gamma 1). The convolutions are the same He-normal (fan_out) either way.
INITS = ("ours", "authors")


def authors_init_(model: nn.Module) -> nn.Module:
    """The BMB authors' initialisation of the heads and batch norms, in place (returns ``model``)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def resolve_memory_format(name: str, device: torch.device | str) -> torch.memory_format:
    """``model.memory_format`` on ``device``: ``auto`` is channels_last on CUDA, contiguous elsewhere."""
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cuda" else "contiguous"
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format must be auto, channels_last or contiguous, got {name!r}")
    return MEMORY_FORMATS[name]


class ModelOutput(NamedTuple):
    features: torch.Tensor  # (B, D) pooled encoder features
    base_logits: torch.Tensor  # (B, C)
    aux_logits: torch.Tensor  # (B, C)


class BMBModel(nn.Module):
    """Encoder + base head + aux head.

    Args:
        encoder: module mapping ``(B, 3, H, W)`` to ``(B, D)`` with attribute ``out_dim = D``.
        num_classes: ``C``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.feat_dim = int(encoder.out_dim)
        self.num_classes = num_classes
        self.base_head = nn.Linear(self.feat_dim, num_classes)
        self.aux_head = nn.Linear(self.feat_dim, num_classes)
        self.memory_format = torch.contiguous_format  # of the weights and of the input (see configure)
        # torch.compile'd encoder used in training mode; a plain attribute (not a submodule), so
        # that state_dict keys stay the same and a deep copy (the EMA model) is an eager model.
        self.encoder_compiled = None

    @classmethod
    def build(cls, encoder: str, num_classes: int, *, init: str = "ours", **encoder_kwargs) -> BMBModel:
        """The model with ``init`` (:data:`INITS`) on freshly built weights."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        model = cls(build_encoder(encoder, **encoder_kwargs), num_classes)
        return authors_init_(model) if init == "authors" else model

    def configure(self, memory_format: torch.memory_format = torch.contiguous_format,
                  compile: bool = False) -> BMBModel:
        """Apply the speed options (in place; returns ``self``).

        ``memory_format``: the conv weights are converted to it, and :meth:`forward` converts its
        input (a no-op when it already is in that layout). ``compile``: ``torch.compile`` the
        encoder for training-mode calls (static shapes: the step's batch never changes shape);
        evaluation (other batch sizes, BN in eval mode) stays eager rather than compiling more
        graphs for a small share of the time, and so do the heads (two small matmuls) and
        everything outside the model. Call after any module surgery (SyncBatchNorm), before the
        first forward.
        """
        self.to(memory_format=memory_format)
        self.memory_format = memory_format
        # Through __dict__: nn.Module.__setattr__ would register the wrapper as a submodule.
        self.__dict__["encoder_compiled"] = torch.compile(self.encoder, dynamic=False) if compile else None
        return self

    def __getstate__(self) -> dict:
        # A deep copy or pickle drops the compiled encoder: it wraps *this* model's encoder, and a
        # copy that kept it would run the original's weights (as nn.Module does for its own
        # ``_compiled_call_impl``).
        state = self.__dict__.copy()
        state.pop("_compiled_call_impl", None)  # as nn.Module.__getstate__ does
        state["encoder_compiled"] = None
        return state

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if self.memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        encoder = self.encoder_compiled if self.training and self.encoder_compiled is not None else self.encoder
        z = encoder(x)
        return ModelOutput(z, self.base_head(z), self.aux_head(z))
