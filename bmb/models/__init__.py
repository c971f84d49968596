"""Encoder + base head + aux head (see :class:`BMBModel`)."""

from bmb.models.encoders import ENCODERS, ResNet50, SmallConvNet, WideResNet, build_encoder
from bmb.models.model import BMBModel, ModelOutput

__all__ = ["ENCODERS", "BMBModel", "ModelOutput", "ResNet50", "SmallConvNet", "WideResNet", "build_encoder"]
