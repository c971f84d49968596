"""Encoders: images ``(B, 3, H, W)`` float -> pooled features ``(B, D)``.

- ``wrn``: Wide ResNet 28-k as used by FixMatch/BMB on CIFAR (leaky ReLU 0.1, BN momentum 0.001).
- ``resnet50``: bottleneck ResNet-50 trained from scratch; ``stem="small"`` (3x3 stride-1 conv, no
  max-pool) for 32/64 px inputs, ``stem="imagenet"`` (7x7 stride-2 conv + max-pool) for 224 px.
- ``small``: a 4-conv network that trains on 2 CPU cores in minutes (demo, tests).
"""

from __future__ import annotations

from torch import nn


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        # Width-changing blocks other than the network's first feed the raw input to both paths
        # (FixMatch's WRN); their pre-activation would be computed and thrown away, leaving
        # parameters without gradients, which DDP rejects. Such blocks have no bn1.
        pre_activate = cin == cout or activate_before_residual
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001) if pre_activate else None
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        if self.shortcut is None:
            return x + self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(x))))))
        src = self.act(self.bn1(x)) if self.bn1 is not None else x
        return self.shortcut(src) + self.conv2(self.act(self.bn2(self.conv1(src))))


class WideResNet(nn.Module):
    """WRN-depth-k; feature dim ``64 * k``."""

    def __init__(self, depth: int = 28, width: int = 2) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        layers = []
        for g in range(3):
            for i in range(n):
                layers.append(_WideBlock(ch[g] if i == 0 else ch[g + 1], ch[g + 1],
                                         (1 if g == 0 else 2) if i == 0 else 1, g == 0 and i == 0))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(ch[3], momentum=0.001)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = ch[3]
        _init(self)

    def forward(self, x):  # (B, 3, H, W) -> (B, 64k)
        return self.pool(self.act(self.bn(self.blocks(self.conv(x))))).flatten(1)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        # Zero-init the last BN so each block starts as identity (helps from-scratch training).
        nn.init.zeros_(self.body[-1].weight)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 trunk; feature dim 2048. ``stem``: ``"small"`` (32/64 px) or ``"imagenet"`` (224 px)."""

    def __init__(self, stem: str = "imagenet") -> None:
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"ResNet50: stem must be 'imagenet' or 'small', got {stem!r}")
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # (B, 3, H, W) -> (B, 2048)
        return self.pool(self.layers(self.stem(x))).flatten(1)


class SmallConvNet(nn.Module):
    """Four 3x3 conv layers (32-64-128-128), BN + ReLU; feature dim 128. For CPU demos/tests."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        c = [3, width, 2 * width, 4 * width, 4 * width]
        mods = []
        for i in range(4):
            mods += [nn.Conv2d(c[i], c[i + 1], 3, 1 if i == 0 else 2, 1, bias=False),
                     nn.BatchNorm2d(c[i + 1]), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1))
        self.out_dim = c[-1]
        _init(self)

    def forward(self, x):  # (B, 3, H, W) -> (B, 4 * width)
        return self.net(x).flatten(1)


ENCODERS = ("wrn", "resnet50", "small")


def build_encoder(name: str, *, width: int | None = None, depth: int = 28, stem: str = "small") -> nn.Module:
    """Encoder by name (see module docstring).

    ``width`` is k for ``wrn`` (default 2) and the base channel count for ``small`` (default 32).
    """
    if name == "wrn":
        return WideResNet(depth, width or 2)
    if name == "resnet50":
        return ResNet50(stem)
    if name == "small":
        return SmallConvNet(width or 32)
    raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
