"""MobileNet-V2 (Sandler et al., 2018) in plain torch, with torchvision's module names, so that
torchvision's ImageNet checkpoint (``mobilenet_v2-b0353104.pth``) loads into it with
``strict=True``: every key and every shape must match.

Input: N x 3 x 224 x 224 float32 (NCHW), RGB / 255 normalised with the ImageNet mean and std.
Output: N x 1000 class probabilities (a softmax over torchvision's logits, so that the output
reads like the other shipped models'), in the class order of ``imagenet_classes.txt``.
"""
from __future__ import annotations

import torch
from torch import nn

# torchvision's inverted_residual_setting: expansion t, output channels c, blocks n, stride s of
# the first block of the group. The strides are nowhere in the checkpoint; the channels are, and
# load_state_dict(strict=True) checks them.
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM, LAST, CLASSES = 32, 1280, 1000
INPUT_SHAPE = (1, 3, 224, 224)


def conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm [-> ReLU6]: torchvision's Conv2dNormActivation,
    whose children are numbered 0, 1, 2 as in the checkpoint."""
    layers = [nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(out)]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (omitted when ``expand`` is 1) -> 3x3 depthwise -> linear 1x1 projection, plus
    the input when the block keeps the shape (stride 1, ``inp == out``)."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers = [conv_bn(inp, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, out, 1, bias=False),
                   nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """features.0 the stem, features.1-17 the inverted residual blocks, features.18 the 1x1 to
    1280 channels; global average pool; classifier.1 the 1280 -> 1000 Linear (classifier.0 is
    torchvision's dropout, inactive in eval mode)."""

    def __init__(self):
        super().__init__()
        layers, inp = [conv_bn(3, STEM, 3, stride=2)], STEM
        for t, c, n, s in SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_bn(inp, LAST, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return torch.softmax(self.classifier(x), dim=1)


def build(state_dict: dict) -> nn.Module:
    """The network in eval mode with ``state_dict`` loaded strictly (RuntimeError naming the
    missing, unexpected or mis-shaped keys otherwise)."""
    net = MobileNetV2()
    net.load_state_dict(state_dict, strict=True)
    return net.eval()
