"""Encoder + base head + aux head (see :class:`BMBModel`)."""

from bmb.models.encoders import ENCODERS, ResNet50, SmallConvNet, WideResNet, build_encoder
from bmb.models.model import MEMORY_FORMATS, BMBModel, ModelOutput, resolve_memory_format

__all__ = ["ENCODERS", "MEMORY_FORMATS", "BMBModel", "ModelOutput", "resolve_memory_format", "ResNet50", "SmallConvNet",
           "WideResNet", "build_encoder"]
