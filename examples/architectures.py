"""Common CNN architectures the project ships no plan for, through `tvm-sparseconv bench`.

Each is defined here in plain torch, with seeded random weights (BatchNorm statistics drawn
too) and exported to ONNX at 1 x 3 x 224 x 224: ResNet-18, EfficientNet-B0 (SiLU,
squeeze-and-excitation, depthwise 5x5), ShuffleNet-V2 (channel split and shuffle), SqueezeNet
(fire modules, ceil-mode pooling), a small DenseNet (BatchNorm before the convs, long concats),
a small ConvNeXt (7x7 depthwise, LayerNorm, GELU, Linear layers over NHWC), a RegNetX-like net
(grouped 3x3 convs of 16 channels per group), a MobileNet-V3-like net (hard-swish,
hard-sigmoid SE), a DeepLab-like head (dilated convs, ASPP concat, bilinear upsampling), an
Inception-v3-like net (1x7 and 7x1 convs, stride-1 average pools, concats), a ResNeXt-like net
(groups of 4 to 32 channels), a U-Net-like net (transposed convs, skip concats), a
YOLO-like net (LeakyReLU, nearest upsampling, two outputs), a CycleGAN-like generator
(reflection pads, instance norms, transposed convs, tanh), ESPCN (tanh, pixel shuffle), AlexNet
(LocalResponseNorm, 11x11 stride-4 conv, classifier layers of 4096), a CSPDarknet-like net
(Mish), a ResNet with GroupNorm and PReLU, an Xception-like net (separable convs, ELU,
Hardtanh, a global max pool), a GhostNet-like net (concats of channel counts that are not
whole blocks), an HRNet-like net (two resolutions exchanging features), a PSPNet-like head
(pyramid pooling to 1, 2 and 4 bins), an EfficientNetV2-like net (fused MBConvs),
DeepLabV3's MobileNet-V2 backbone (dilated depthwise convs), a ResNet-D-like net (average-pool
shortcuts), a MixNet-like net (channel splits, depthwise kernels of 3 to 9), a ResNeSt-like net
(split attention: a softmax over the radix axis of a 5-D tensor) and a RetinaNet-like
detector (a feature pyramid, heads whose weights the four levels share, NHWC reshapes and
concats to anchors, two outputs).

They check coverage and speed, not accuracy: the weights are random, so the activations'
densities are not those of a trained model, and a plan predicted or tuned on them says
nothing about the sparse algorithms on real weights.

    python examples/architectures.py                    # all, bench --rounds 5 --repeat 5
    python examples/architectures.py regnetx --rounds 3 # one; further arguments go to bench
    python examples/architectures.py resnet18 --batch 8 # exported with a dynamic batch axis

The ONNX files and the bench JSON go to build/architectures/ (or $OUT); with ``--batch`` the
files are exported with a dynamic batch axis and named NAME-batch.onnx / NAME-bN.json.
"""
import os
import subprocess
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def bn(c):
    """BatchNorm with drawn affine parameters and running statistics (not the identity)."""
    b = nn.BatchNorm2d(c)
    with torch.no_grad():
        b.weight.uniform_(0.5, 1.5); b.bias.uniform_(-0.2, 0.2)
        b.running_mean.uniform_(-0.1, 0.1); b.running_var.uniform_(0.5, 1.5)
    return b

def cbr(i, o, k=3, s=1, g=1, act=nn.ReLU, d=1):
    p = (k // 2) * d
    return nn.Sequential(nn.Conv2d(i, o, k, s, p, dilation=d, groups=g, bias=False), bn(o), act() if act else nn.Identity())

class Basic(nn.Module):
    def __init__(s, i, o, st):
        super().__init__()
        s.a = cbr(i, o, 3, st); s.b = cbr(o, o, 3, 1, act=None)
        s.sc = cbr(i, o, 1, st, act=None) if (st != 1 or i != o) else nn.Identity()
    def forward(s, x): return F.relu(s.b(s.a(x)) + s.sc(x))

class ResNet18(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        L = []; c = 64
        for o, st in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            L.append(Basic(c, o, st)); c = o
        s.layers = nn.Sequential(*L); s.fc = nn.Linear(512, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.layers(s.stem(x)), 1), 1))

class SE(nn.Module):
    def __init__(s, c, r):
        super().__init__(); s.a = nn.Conv2d(c, r, 1); s.b = nn.Conv2d(r, c, 1)
    def forward(s, x): return x * torch.sigmoid(s.b(F.silu(s.a(F.adaptive_avg_pool2d(x, 1)))))

class MBConv(nn.Module):
    def __init__(s, i, o, k, st, e):
        super().__init__(); h = i * e
        s.ex = cbr(i, h, 1, act=nn.SiLU) if e != 1 else nn.Identity()
        s.dw = cbr(h, h, k, st, g=h, act=nn.SiLU); s.se = SE(h, max(1, i // 4))
        s.pr = cbr(h, o, 1, act=None); s.res = st == 1 and i == o
    def forward(s, x):
        y = s.pr(s.se(s.dw(s.ex(x))))
        return x + y if s.res else y

class EffNetB0(nn.Module):
    def __init__(s):
        super().__init__()
        cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
        L = [cbr(3, 32, 3, 2, act=nn.SiLU)]; c = 32
        for e, o, n, st, k in cfg:
            for j in range(n):
                L.append(MBConv(c, o, k, st if j == 0 else 1, e)); c = o
        L.append(cbr(c, 1280, 1, act=nn.SiLU)); s.f = nn.Sequential(*L); s.fc = nn.Linear(1280, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.f(x), 1), 1))

def shuffle(x, g):
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

class ShuffleUnit(nn.Module):
    def __init__(s, i, o, st):
        super().__init__(); s.st = st; b = o // 2
        if st > 1:
            s.br1 = nn.Sequential(cbr(i, i, 3, st, g=i, act=None), cbr(i, b, 1))
        s.br2 = nn.Sequential(cbr(i if st > 1 else b, b, 1), cbr(b, b, 3, st, g=b, act=None), cbr(b, b, 1))
    def forward(s, x):
        if s.st == 1:
            a, b = x.chunk(2, dim=1); out = torch.cat((a, s.br2(b)), 1)
        else:
            out = torch.cat((s.br1(x), s.br2(x)), 1)
        return shuffle(out, 2)

class ShuffleNetV2(nn.Module):
    def __init__(s):
        super().__init__()
        L = [cbr(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)]; c = 24
        for o, n in [(116, 4), (232, 8), (464, 4)]:
            for j in range(n):
                L.append(ShuffleUnit(c, o, 2 if j == 0 else 1)); c = o
        L.append(cbr(c, 1024, 1)); s.f = nn.Sequential(*L); s.fc = nn.Linear(1024, 1000)
    def forward(s, x): return s.fc(s.f(x).mean([2, 3]))

class Fire(nn.Module):
    def __init__(s, i, sq, e):
        super().__init__(); s.s = nn.Conv2d(i, sq, 1); s.a = nn.Conv2d(sq, e, 1); s.b = nn.Conv2d(sq, e, 3, padding=1)
    def forward(s, x):
        x = F.relu(s.s(x)); return torch.cat([F.relu(s.a(x)), F.relu(s.b(x))], 1)

class SqueezeNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(nn.Conv2d(3, 64, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128), Fire(256, 32, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))
        s.c = nn.Conv2d(512, 1000, 1)
    def forward(s, x): return torch.flatten(F.adaptive_avg_pool2d(F.relu(s.c(s.f(x))), 1), 1)

class DenseLayer(nn.Module):
    def __init__(s, i, g):
        super().__init__(); s.n1 = bn(i); s.c1 = nn.Conv2d(i, 4 * g, 1, bias=False); s.n2 = bn(4 * g); s.c2 = nn.Conv2d(4 * g, g, 3, padding=1, bias=False)
    def forward(s, x): return torch.cat([x, s.c2(F.relu(s.n2(s.c1(F.relu(s.n1(x))))))], 1)

class DenseNetSmall(nn.Module):
    def __init__(s):
        super().__init__()
        L = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]; c = 64
        for bi, n in enumerate([6, 12, 8]):
            for j in range(n):
                L.append(DenseLayer(c, 32)); c += 32
            if bi < 2:
                L += [bn(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]; c //= 2
        L += [bn(c), nn.ReLU()]; s.f = nn.Sequential(*L); s.fc = nn.Linear(c, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.f(x), 1), 1))

class LN2d(nn.Module):
    def __init__(s, c): super().__init__(); s.ln = nn.LayerNorm(c)
    def forward(s, x): return s.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class CNXBlock(nn.Module):
    def __init__(s, c):
        super().__init__(); s.dw = nn.Conv2d(c, c, 7, padding=3, groups=c); s.ln = nn.LayerNorm(c)
        s.a = nn.Linear(c, 4 * c); s.b = nn.Linear(4 * c, c)
    def forward(s, x):
        y = s.dw(x).permute(0, 2, 3, 1); y = s.b(F.gelu(s.a(s.ln(y)))); return x + y.permute(0, 3, 1, 2)

class ConvNeXtTiny(nn.Module):
    def __init__(s, dims=(48, 96, 192, 384), depth=(2, 2, 4, 2)):
        super().__init__()
        L = [nn.Conv2d(3, dims[0], 4, 4), LN2d(dims[0])]
        for i, (d, n) in enumerate(zip(dims, depth)):
            if i: L += [LN2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            L += [CNXBlock(d) for _ in range(n)]
        s.f = nn.Sequential(*L); s.ln = nn.LayerNorm(dims[-1]); s.fc = nn.Linear(dims[-1], 1000)
    def forward(s, x): return s.fc(s.ln(s.f(x).mean([-2, -1])))

class RegNetBlock(nn.Module):
    def __init__(s, i, o, st, gw):
        super().__init__(); s.a = cbr(i, o, 1); s.b = cbr(o, o, 3, st, g=o // gw); s.c = cbr(o, o, 1, act=None)
        s.sc = cbr(i, o, 1, st, act=None) if (st != 1 or i != o) else nn.Identity()
    def forward(s, x): return F.relu(s.c(s.b(s.a(x))) + s.sc(x))

class RegNetX(nn.Module):
    def __init__(s):
        super().__init__()
        L = [cbr(3, 32, 3, 2)]; c = 32
        for o, n in [(32, 1), (64, 2), (160, 4), (384, 2)]:
            for j in range(n):
                L.append(RegNetBlock(c, o, 2 if j == 0 else 1, 16)); c = o
        s.f = nn.Sequential(*L); s.fc = nn.Linear(c, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.f(x), 1), 1))

def hard_se(c):
    """MobileNet-V3's squeeze-and-excitation: its scales through a hard sigmoid."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1),
                         nn.Hardsigmoid())

class MNv3Block(nn.Module):
    def __init__(s, i, h, o, k, st):
        super().__init__()
        s.e = cbr(i, h, 1, act=nn.Hardswish); s.d = cbr(h, h, k, st, g=h, act=nn.Hardswish)
        s.sq = hard_se(h)
        s.p = cbr(h, o, 1, act=None); s.res = st == 1 and i == o
    def forward(s, x):
        y = s.d(s.e(x)); y = s.p(y * s.sq(y)); return x + y if s.res else y

class MobileNetV3ish(nn.Module):
    def __init__(s):
        super().__init__()
        L = [cbr(3, 16, 3, 2, act=nn.Hardswish)]; c = 16
        for h, o, k, st in [(64, 24, 3, 2), (72, 24, 3, 1), (96, 40, 5, 2), (240, 40, 5, 1), (240, 80, 3, 2), (480, 112, 3, 1), (672, 160, 5, 2), (960, 160, 5, 1)]:
            L.append(MNv3Block(c, h, o, k, st)); c = o
        L.append(cbr(c, 960, 1, act=nn.Hardswish)); s.f = nn.Sequential(*L)
        s.h = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Linear(1280, 1000))
    def forward(s, x): return s.h(torch.flatten(F.adaptive_avg_pool2d(s.f(x), 1), 1))

class Dilated(nn.Module):
    """DeepLab-ish: dilated 3x3s, ASPP concat, bilinear upsample to input size."""
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 64, 3, 2), cbr(64, 64, 3, 1, d=2), cbr(64, 128, 3, 1, d=4))
        s.aspp = nn.ModuleList([cbr(128, 32, 1), cbr(128, 32, 3, d=2), cbr(128, 32, 3, d=6)])
        s.out = nn.Conv2d(96, 21, 1)
    def forward(s, x):
        y = s.f(x); y = torch.cat([a(y) for a in s.aspp], 1)
        return F.interpolate(s.out(y), scale_factor=4, mode="bilinear", align_corners=False)

class IncA(nn.Module):
    def __init__(s, i, pool):
        super().__init__()
        s.b1 = cbr(i, 64, 1); s.b5 = nn.Sequential(cbr(i, 48, 1), cbr(48, 64, 5))
        s.b3 = nn.Sequential(cbr(i, 64, 1), cbr(64, 96, 3), cbr(96, 96, 3)); s.bp = cbr(i, pool, 1)
    def forward(s, x):
        return torch.cat([s.b1(x), s.b5(x), s.b3(x), s.bp(F.avg_pool2d(x, 3, 1, 1))], 1)

def c17(i, o, k, p):
    return nn.Sequential(nn.Conv2d(i, o, k, 1, p, bias=False), bn(o), nn.ReLU())

class IncC(nn.Module):
    def __init__(s, i, c7):
        super().__init__()
        s.b1 = cbr(i, 192, 1)
        s.b7 = nn.Sequential(cbr(i, c7, 1), c17(c7, c7, (1, 7), (0, 3)), c17(c7, 192, (7, 1), (3, 0)))
        s.bp = cbr(i, 192, 1)
    def forward(s, x):
        return torch.cat([s.b1(x), s.b7(x), s.bp(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))], 1)

class Inception(nn.Module):
    """Inception-v3-like: unpadded stem, 5x5 and double-3x3 branches, 1x7 / 7x1 factorized
    convs, average pools of stride 1 (with and without the padding counted), long concats."""
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 32, 3), cbr(32, 64, 3), nn.MaxPool2d(3, 2), cbr(64, 80, 1), cbr(80, 192, 3), nn.MaxPool2d(3, 2))
        s.a = nn.Sequential(IncA(192, 32), IncA(256, 64))
        s.red = nn.Conv2d(288, 768, 3, 2)
        s.c = nn.Sequential(IncC(768, 128), IncC(576, 160))
        s.fc = nn.Linear(576, 1000)
    def forward(s, x):
        y = s.c(F.relu(s.red(s.a(s.stem(x)))))
        return s.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

class XBlock(nn.Module):
    def __init__(s, i, w, o, st, g=32):
        super().__init__()
        s.f = nn.Sequential(cbr(i, w, 1), cbr(w, w, 3, st, g=g), cbr(w, o, 1, act=None))
        s.sc = cbr(i, o, 1, st, act=None) if (st != 1 or i != o) else nn.Identity()
    def forward(s, x): return F.relu(s.f(x) + s.sc(x))

class ResNeXt(nn.Module):
    """ResNeXt-50-like (32 groups of 4 to 32 channels), fewer blocks."""
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        L = []; c = 64
        for w, o, st in [(128, 256, 1), (128, 256, 1), (256, 512, 2), (256, 512, 1), (512, 1024, 2), (1024, 2048, 2)]:
            L.append(XBlock(c, w, o, st)); c = o
        s.L = nn.Sequential(*L); s.fc = nn.Linear(2048, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.L(s.stem(x)), 1), 1))

class UNet(nn.Module):
    """U-Net-like: 2x2 stride-2 transposed convs (up-convs), skip concats, a sigmoid output."""
    def __init__(s):
        super().__init__()
        s.e1 = nn.Sequential(cbr(3, 32), cbr(32, 32)); s.e2 = nn.Sequential(cbr(32, 64), cbr(64, 64))
        s.e3 = nn.Sequential(cbr(64, 128), cbr(128, 128))
        s.u2 = nn.ConvTranspose2d(128, 64, 2, 2); s.d2 = nn.Sequential(cbr(128, 64), cbr(64, 64))
        s.u1 = nn.ConvTranspose2d(64, 32, 2, 2); s.d1 = nn.Sequential(cbr(64, 32), cbr(32, 32))
        s.out = nn.Conv2d(32, 2, 1)
    def forward(s, x):
        a = s.e1(x); b = s.e2(F.max_pool2d(a, 2)); c = s.e3(F.max_pool2d(b, 2))
        y = s.d2(torch.cat([s.u2(c), b], 1)); y = s.d1(torch.cat([s.u1(y), a], 1))
        return torch.sigmoid(s.out(y))

class YoloIsh(nn.Module):
    """YOLO-ish: LeakyReLU 0.1, stride-2 convs, a residual, nearest upsample + concat, two heads
    (two outputs)."""
    def __init__(s):
        super().__init__()
        lk = lambda: nn.LeakyReLU(0.1)
        s.a = nn.Sequential(cbr(3, 32, 3, act=lk), cbr(32, 64, 3, 2, act=lk), cbr(64, 128, 3, 2, act=lk), cbr(128, 256, 3, 2, act=lk))
        s.r = nn.Sequential(cbr(256, 128, 1, act=lk), cbr(128, 256, 3, act=lk))
        s.b = cbr(256, 512, 3, 2, act=lk); s.h1 = nn.Conv2d(512, 255, 1)
        s.lat = cbr(512, 128, 1, act=lk); s.h2 = nn.Sequential(cbr(384, 256, 3, act=lk), nn.Conv2d(256, 255, 1))
    def forward(s, x):
        y = s.a(x); y = y + s.r(y); z = s.b(y)
        u = F.interpolate(s.lat(z), scale_factor=2, mode="nearest")
        return s.h1(z), s.h2(torch.cat([u, y], 1))

class ResBlk(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.f = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))
    def forward(s, x): return x + s.f(x)

class CycleGen(nn.Module):
    """CycleGAN's ResNet generator, smaller: reflection pads, instance norms, residual blocks,
    3x3 stride-2 transposed convs (output padding 1), a tanh output."""
    def __init__(s):
        super().__init__()
        L = [nn.ReflectionPad2d(3), nn.Conv2d(3, 32, 7), nn.InstanceNorm2d(32), nn.ReLU(),
             nn.Conv2d(32, 64, 3, 2, 1), nn.InstanceNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1), nn.InstanceNorm2d(128), nn.ReLU()]
        L += [ResBlk(128) for _ in range(3)]
        L += [nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU(),
              nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(32), nn.ReLU(),
              nn.ReflectionPad2d(3), nn.Conv2d(32, 3, 7), nn.Tanh()]
        s.f = nn.Sequential(*L)
    def forward(s, x): return s.f(x)

class ESPCN(nn.Module):
    """ESPCN super-resolution: tanh activations, a pixel shuffle (DepthToSpace) by 3."""
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(nn.Conv2d(3, 64, 5, padding=2), nn.Tanh(), nn.Conv2d(64, 32, 3, padding=1), nn.Tanh(),
                            nn.Conv2d(32, 3 * 9, 3, padding=1), nn.PixelShuffle(3))
    def forward(s, x): return s.f(x)

class AlexNet(nn.Module):
    """AlexNet: an 11x11 stride-4 conv, LocalResponseNorms (a power of 0.75), overlapping max
    pools, classifier layers of 4096 (a 9216 x 4096 weight at 224 x 224: 151 MB)."""
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.LocalResponseNorm(5), nn.MaxPool2d(3, 2),
                            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.LocalResponseNorm(5), nn.MaxPool2d(3, 2),
                            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        s.c = nn.Sequential(nn.Dropout(), nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
                            nn.Linear(4096, 1000))
    def forward(s, x): return s.c(torch.flatten(s.f(x), 1))

class Mish(nn.Module):
    def forward(s, x): return x * torch.tanh(F.softplus(x))  # as YOLOv4 writes it (the exporter: Softplus, Tanh, Mul)

class CSP(nn.Module):
    def __init__(s, c, n):
        super().__init__(); h = c // 2
        s.a = cbr(c, h, 1, act=Mish); s.b = cbr(c, h, 1, act=Mish)
        s.m = nn.Sequential(*[nn.Sequential(cbr(h, h, 1, act=Mish), cbr(h, h, 3, act=Mish)) for _ in range(n)])
        s.o = cbr(2 * h, c, 1, act=Mish)
    def forward(s, x): return s.o(torch.cat([s.m(s.a(x)), s.b(x)], 1))

class CSPDarknet(nn.Module):
    """CSPDarknet-like (YOLOv4's backbone, smaller): Mish, cross-stage partial concats, a
    sigmoid 1x1 head."""
    def __init__(s):
        super().__init__()
        L = [cbr(3, 32, 3, act=Mish)]; c = 32
        for o, n in [(64, 1), (128, 2), (256, 2), (512, 1)]:
            L += [cbr(c, o, 3, 2, act=Mish), CSP(o, n)]; c = o
        s.f = nn.Sequential(*L); s.h = nn.Conv2d(c, 255, 1)
    def forward(s, x): return torch.sigmoid(s.h(s.f(x)))

class GNBlock(nn.Module):
    def __init__(s, i, o, st):
        super().__init__()
        s.a = nn.Sequential(nn.Conv2d(i, o, 3, st, 1, bias=False), nn.GroupNorm(8, o), nn.PReLU(o))
        s.b = nn.Sequential(nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.GroupNorm(8, o))
        s.sc = nn.Sequential(nn.Conv2d(i, o, 1, st, bias=False), nn.GroupNorm(8, o)) if st != 1 or i != o else nn.Identity()
    def forward(s, x): return F.relu(s.b(s.a(x)) + s.sc(x))

class GNResNet(nn.Module):
    """A ResNet with GroupNorm (8 groups) and per-channel PReLUs, a softmax output."""
    def __init__(s):
        super().__init__()
        L = [nn.Conv2d(3, 64, 7, 2, 3), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]; c = 64
        for o, st in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            L.append(GNBlock(c, o, st)); c = o
        s.f = nn.Sequential(*L); s.fc = nn.Linear(512, 10)
    def forward(s, x): return F.softmax(s.fc(torch.flatten(F.adaptive_avg_pool2d(s.f(x), 1), 1)), 1)

def sep(i, o):
    return nn.Sequential(nn.Conv2d(i, i, 3, 1, 1, groups=i, bias=False), nn.Conv2d(i, o, 1, bias=False), bn(o))

class XceptionBlock(nn.Module):
    def __init__(s, i, o, first_relu=True):
        super().__init__()
        s.m = nn.Sequential(nn.ReLU() if first_relu else nn.Identity(), sep(i, o), nn.ReLU(), sep(o, o), nn.MaxPool2d(3, 2, 1))
        s.sc = nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), bn(o))
    def forward(s, x): return s.m(x) + s.sc(x)

class Xception(nn.Module):
    """Xception-like entry and exit flows: separable convs (depthwise then 1x1, ReLU before
    them), max-pool residuals with 1x1 stride-2 shortcuts, an ELU and a Hardtanh(0, 6), a global
    max pool."""
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 64, 3), XceptionBlock(64, 128, False), XceptionBlock(128, 256),
                            XceptionBlock(256, 728),
                            nn.ReLU(), sep(728, 728), nn.ELU(), sep(728, 1024), nn.Hardtanh(0, 6))
        s.fc = nn.Linear(1024, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_max_pool2d(s.f(x), 1), 1))

class Ghost(nn.Module):
    """GhostNet's module: half the channels from a 1x1 conv, half from a depthwise 3x3 of those,
    concatenated (halves that are not whole channel blocks: 8, 12, 20, 36, ... channels)."""
    def __init__(s, i, o, relu=True):
        super().__init__(); h = o // 2
        s.p = cbr(i, h, 1, act=nn.ReLU if relu else None)
        s.c = cbr(h, h, 3, g=h, act=nn.ReLU if relu else None)
    def forward(s, x):
        y = s.p(x); return torch.cat([y, s.c(y)], 1)

class GhostBneck(nn.Module):
    def __init__(s, i, h, o, k, st, se):
        super().__init__()
        s.g1 = Ghost(i, h); s.dw = cbr(h, h, k, st, g=h, act=None) if st > 1 else nn.Identity()
        s.se = hard_se(h) if se else None
        s.g2 = Ghost(h, o, relu=False)
        s.sc = (nn.Identity() if (st == 1 and i == o) else
                nn.Sequential(cbr(i, i, k, st, g=i, act=None), cbr(i, o, 1, act=None)))
    def forward(s, x):
        y = s.dw(s.g1(x))
        if s.se is not None: y = y * s.se(y)
        return s.g2(y) + s.sc(x)

class GhostNet(nn.Module):
    """GhostNet-like: ghost bottlenecks with hard-sigmoid SE and depthwise stride-2 shortcuts."""
    def __init__(s):
        super().__init__()
        cfg = [(16, 16, 16, 3, 1, 0), (16, 48, 24, 3, 2, 0), (24, 72, 24, 3, 1, 0), (24, 72, 40, 5, 2, 1),
               (40, 120, 40, 5, 1, 1), (40, 240, 80, 3, 2, 0), (80, 200, 80, 3, 1, 0), (80, 480, 112, 3, 1, 1),
               (112, 672, 160, 5, 2, 1), (160, 960, 160, 5, 1, 0)]
        s.stem = cbr(3, 16, 3, 2)
        s.blocks = nn.Sequential(*[GhostBneck(*c) for c in cfg])
        s.head = cbr(160, 960, 1); s.fc = nn.Linear(960, 1000)
    def forward(s, x):
        return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.head(s.blocks(s.stem(x))), 1), 1))

class HRNetish(nn.Module):
    """HRNet-like: two resolutions exchanging features (a strided 3x3 down, a 1x1 and nearest
    upsampling up, sums), then both concatenated at the higher one for a 17-channel heatmap head."""
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(cbr(3, 64, 3, 2), cbr(64, 64, 3, 2))
        s.hi0 = cbr(64, 32, 3); s.lo0 = cbr(64, 64, 3, 2)
        s.units = nn.ModuleList()
        for _ in range(3):
            s.units.append(nn.ModuleDict({"hb": nn.Sequential(cbr(32, 32), cbr(32, 32)),
                                          "lb": nn.Sequential(cbr(64, 64), cbr(64, 64)),
                                          "down": cbr(32, 64, 3, 2, act=None), "up": cbr(64, 32, 1, act=None)}))
        s.head = cbr(96, 64, 1); s.out = nn.Conv2d(64, 17, 1)
    def forward(s, x):
        x = s.stem(x); h, l = s.hi0(x), s.lo0(x)
        for u in s.units:
            h, l = u["hb"](h), u["lb"](l)
            h, l = F.relu(h + F.interpolate(u["up"](l), scale_factor=2, mode="nearest")), F.relu(l + u["down"](h))
        y = torch.cat([h, F.interpolate(l, scale_factor=2, mode="bilinear", align_corners=False)], 1)
        return s.out(s.head(y))

class PSPish(nn.Module):
    """PSPNet-like: a dilated backbone at stride 8, pyramid pooling (adaptive average pools to
    1, 2 and 4 bins, a 1x1 each, bilinear back up), a concat, a 3x3 and a classifier, bilinear x 8."""
    def __init__(s):
        super().__init__()
        s.back = nn.Sequential(cbr(3, 64, 3, 2), cbr(64, 64, 3, 2), cbr(64, 128, 3, 2), cbr(128, 256),
                               cbr(256, 256, d=2))
        s.bins = (1, 2, 4)
        s.stages = nn.ModuleList([cbr(256, 64, 1) for _ in s.bins])
        s.fuse = cbr(256 + 64 * 3, 128); s.cls = nn.Conv2d(128, 21, 1)
    def forward(s, x):
        f = s.back(x); size = f.shape[2:]
        ps = [F.interpolate(st(F.adaptive_avg_pool2d(f, b)), size=size, mode="bilinear", align_corners=False)
              for st, b in zip(s.stages, s.bins)]
        y = s.cls(s.fuse(torch.cat([f] + ps, 1)))
        return F.interpolate(y, scale_factor=8, mode="bilinear", align_corners=False)

class FusedMB(nn.Module):
    """EfficientNetV2's fused MBConv: a full 3x3 expansion conv, a 1x1 projection, SiLU."""
    def __init__(s, i, o, st, e):
        super().__init__()
        s.a = cbr(i, i * e, 3, st, act=nn.SiLU); s.b = cbr(i * e, o, 1, act=None); s.res = st == 1 and i == o
    def forward(s, x):
        y = s.b(s.a(x)); return x + y if s.res else y

class EffV2ish(nn.Module):
    """EfficientNetV2-like: fused MBConvs at the high resolutions, MBConvs with SE after."""
    def __init__(s):
        super().__init__()
        s.stem = cbr(3, 24, 3, 2, act=nn.SiLU)
        s.f = nn.Sequential(FusedMB(24, 24, 1, 1), FusedMB(24, 48, 2, 4), FusedMB(48, 48, 1, 4), FusedMB(48, 64, 2, 4),
                            FusedMB(64, 64, 1, 4))
        s.m = nn.Sequential(MBConv(64, 128, 3, 2, 4), MBConv(128, 128, 3, 1, 4), MBConv(128, 160, 3, 1, 6),
                            MBConv(160, 256, 3, 2, 6))
        s.head = cbr(256, 1280, 1, act=nn.SiLU); s.fc = nn.Linear(1280, 1000)
    def forward(s, x):
        return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.head(s.m(s.f(s.stem(x)))), 1), 1))

class InvertedResidual(nn.Module):
    """An expanding 1x1 (``act``), the depthwise stage ``dw(h)`` builds, a projecting 1x1, and the
    residual where the shapes allow."""
    def __init__(s, i, o, st, e, dw, act):
        super().__init__(); h = i * e
        s.a = cbr(i, h, 1, act=act); s.dw = dw(h); s.p = cbr(h, o, 1, act=None); s.res = st == 1 and i == o
    def forward(s, x):
        y = s.p(s.dw(s.a(x))); return x + y if s.res else y

def DilatedMB(i, o, st, e, d):
    """MobileNet-V2's inverted residual (ReLU6) with a dilated depthwise conv."""
    return InvertedResidual(i, o, st, e, lambda h: cbr(h, h, 3, st, g=h, act=nn.ReLU6, d=d), nn.ReLU6)

class DeepLabMNv2(nn.Module):
    """DeepLabV3's MobileNet-V2 backbone at output stride 8 (depthwise convs dilated 2 and 4
    instead of the last strides), a 1x1 classifier of 21 classes and a bilinear upsampling."""
    def __init__(s):
        super().__init__()
        L = [cbr(3, 32, 3, 2, act=nn.ReLU6), DilatedMB(32, 16, 1, 1, 1)]; c = 16
        for o, n, st, d in [(24, 2, 2, 1), (32, 3, 2, 1), (64, 4, 1, 2), (96, 3, 1, 2), (160, 3, 1, 4), (320, 1, 1, 4)]:
            for j in range(n):
                L.append(DilatedMB(c, o, st if j == 0 else 1, 6, d)); c = o
        s.f = nn.Sequential(*L); s.head = nn.Conv2d(c, 21, 1)
    def forward(s, x):
        return F.interpolate(s.head(s.f(x)), scale_factor=8, mode="bilinear", align_corners=False)

class ResDBlock(nn.Module):
    """A bottleneck whose middle stage ``mid(m, st)`` builds (a 3x3 conv of stride st by default)
    and whose downsampling shortcut is an average pool (ceil mode, padding not counted) and a 1x1
    conv, as in ResNet-D."""
    def __init__(s, i, m, o, st, mid=lambda m, st: cbr(m, m, 3, st)):
        super().__init__()
        s.a = cbr(i, m, 1); s.b = mid(m, st); s.c = cbr(m, o, 1, act=None)
        pool = nn.AvgPool2d(st, st, ceil_mode=True, count_include_pad=False) if st > 1 else nn.Identity()
        s.sc = nn.Identity() if (st == 1 and i == o) else nn.Sequential(pool, cbr(i, o, 1, act=None))
    def forward(s, x):
        return F.relu(s.c(s.b(s.a(x))) + s.sc(x))

class DeepStemResNet(nn.Module):
    """A stem of three 3x3 convs and a max pool, then ResDBlocks (``mid``, their middle stage) of
    m -> 2m channels for each (m, blocks, stride of the first) of ``stages``, a global average
    pool and a classifier."""
    def __init__(s, stages, mid=lambda m, st: cbr(m, m, 3, st)):
        super().__init__()
        s.stem = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 32, 3), cbr(32, 64, 3), nn.MaxPool2d(3, 2, 1))
        L = []; c = 64
        for m, n, st in stages:
            for j in range(n):
                L.append(ResDBlock(c, m, 2 * m, st if j == 0 else 1, mid)); c = 2 * m
        s.f = nn.Sequential(*L); s.fc = nn.Linear(c, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.f(s.stem(x)), 1), 1))

def ResNetD():
    """ResNet-D-like: average-pool shortcuts."""
    return DeepStemResNet([(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 1, 2)])

class MixConv(nn.Module):
    """MixNet's depthwise conv: the channels split in parts, one kernel size per part."""
    def __init__(s, c, ks, st):
        super().__init__(); n = len(ks); s.parts = [c // n] * (n - 1) + [c - c // n * (n - 1)]
        s.convs = nn.ModuleList(nn.Conv2d(p, p, k, st, k // 2, groups=p, bias=False) for p, k in zip(s.parts, ks))
    def forward(s, x):
        return torch.cat([cv(t) for cv, t in zip(s.convs, torch.split(x, s.parts, 1))], 1)

def MixBlock(i, o, st, e, ks):
    """MixNet's inverted residual (SiLU): its depthwise stage a MixConv of kernel sizes ``ks``."""
    return InvertedResidual(i, o, st, e, lambda h: nn.Sequential(MixConv(h, ks, st), bn(h), nn.SiLU()), nn.SiLU)

class MixNet(nn.Module):
    """MixNet-like: depthwise convs of mixed kernel sizes (3 to 9) over channel splits."""
    def __init__(s):
        super().__init__()
        s.stem = cbr(3, 16, 3, 2)
        s.f = nn.Sequential(MixBlock(16, 24, 2, 3, (3,)), MixBlock(24, 24, 1, 3, (3,)), MixBlock(24, 40, 2, 6, (3, 5, 7)),
                            MixBlock(40, 40, 1, 6, (3, 5)), MixBlock(40, 80, 2, 6, (3, 5, 7)),
                            MixBlock(80, 80, 1, 6, (3, 5, 7, 9)), MixBlock(80, 120, 1, 6, (3, 5, 7)),
                            MixBlock(120, 200, 2, 6, (3, 5, 7, 9)), MixBlock(200, 200, 1, 6, (3, 5, 7, 9)))
        s.head = cbr(200, 1536, 1); s.fc = nn.Linear(1536, 1000)
    def forward(s, x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.head(s.f(s.stem(x))), 1), 1))

class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): a grouped 3x3 makes two splits of ``c`` channels;
    their sum's global average, through two 1x1s, gives per-channel weights softmaxed over the
    splits; the output is the weighted sum of the splits. The reshapes read the traced shape,
    as the exported models do (Shape, Gather, Concat, Reshape in the ONNX)."""
    def __init__(s, c, r=2):
        super().__init__(); s.r = r
        s.conv = cbr(c, c * r, 3, g=r); s.fc1 = cbr(c, c // 2, 1); s.fc2 = nn.Conv2d(c // 2, c * r, 1)
    def forward(s, x):
        y = s.conv(x); n, _, h, w = y.shape
        splits = y.reshape(n, s.r, -1, h, w)
        a = s.fc2(s.fc1(F.adaptive_avg_pool2d(splits.sum(1), 1))).reshape(n, s.r, -1, 1, 1).softmax(1)
        return (splits * a).sum(1)

def split_attention_stage(m, st):
    """ResNeSt's middle stage: split attention, then a 3x3 average pool for the stride."""
    return nn.Sequential(SplitAttention(m), nn.AvgPool2d(3, st, 1) if st > 1 else nn.Identity())

def ResNeSt():
    """ResNeSt-like: split-attention bottlenecks (softmax over the radix axis of a 5-D tensor)."""
    return DeepStemResNet([(64, 2, 1), (128, 2, 2), (256, 1, 2), (512, 1, 2)], split_attention_stage)

class RetinaNetish(nn.Module):
    """RetinaNet-like: a ResNet backbone, a feature pyramid (lateral 1x1s, nearest upsampling
    and adds, 3x3 smoothing, a stride-2 level on top), and box and class heads whose weights
    are shared by the four levels, each level's map permuted to NHWC and reshaped to anchors
    before the concat. Two outputs: 1 x anchors x 4 boxes, 1 x anchors x 20 sigmoid scores."""
    def __init__(s, a=3, k=20):
        super().__init__(); s.a, s.k = a, k
        s.stem = nn.Sequential(cbr(3, 32, 3, 2), nn.MaxPool2d(3, 2, 1), Basic(32, 32, 1))
        s.c3 = nn.Sequential(Basic(32, 64, 2), Basic(64, 64, 1))
        s.c4 = Basic(64, 128, 2); s.c5 = Basic(128, 256, 2)
        s.lat = nn.ModuleList(nn.Conv2d(c, 64, 1) for c in (64, 128, 256))
        s.smooth = nn.ModuleList(nn.Conv2d(64, 64, 3, 1, 1) for _ in range(3))
        s.p6 = nn.Conv2d(256, 64, 3, 2, 1)
        s.box = nn.Sequential(cbr(64, 64, 3), nn.Conv2d(64, a * 4, 3, 1, 1))
        s.cls = nn.Sequential(cbr(64, 64, 3), nn.Conv2d(64, a * k, 3, 1, 1))
    def forward(s, x):
        c3 = s.c3(s.stem(x)); c4 = s.c4(c3); c5 = s.c5(c4)
        p5 = s.lat[2](c5)
        p4 = s.lat[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = s.lat[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        levels = [s.smooth[0](p3), s.smooth[1](p4), s.smooth[2](p5), s.p6(c5)]
        flat = lambda t, d: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, d)
        boxes = torch.cat([flat(s.box(p), 4) for p in levels], 1)
        scores = torch.cat([flat(s.cls(p), s.k) for p in levels], 1)
        return boxes, torch.sigmoid(scores)

NETS = {"resnet18": ResNet18, "efficientnet-b0": EffNetB0, "shufflenet-v2": ShuffleNetV2, "squeezenet": SqueezeNet,
        "densenet-small": DenseNetSmall, "convnext-small": ConvNeXtTiny, "regnetx": RegNetX, "mobilenet-v3ish": MobileNetV3ish,
        "deeplab-ish": Dilated, "inception-v3ish": Inception, "resnext": ResNeXt, "unet": UNet, "yolo-ish": YoloIsh,
        "cyclegan-gen": CycleGen, "espcn": ESPCN, "alexnet": AlexNet, "cspdarknet-mish": CSPDarknet,
        "gn-resnet": GNResNet, "xception-ish": Xception, "ghostnet": GhostNet, "hrnet-ish": HRNetish, "psp-ish": PSPish,
        "efficientnetv2-ish": EffV2ish, "deeplab-mnv2": DeepLabMNv2, "resnet-d": ResNetD, "mixnet": MixNet,
        "resnest-ish": ResNeSt, "retinanet-ish": RetinaNetish}


def export(name: str, path: str, size: int | tuple[int, int] = 224, dynamic_batch: bool = False,
           opset: int = 17) -> str:
    """NETS[name] with torch.manual_seed(0) weights, exported to ``path`` (ONNX ``opset``) for
    1 x 3 x H x W inputs (``size`` is H = W, or (H, W)), or N x 3 x H x W with ``dynamic_batch``
    (every output's first axis N too)."""
    torch.manual_seed(0)
    net = NETS[name]().eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = net(x)  # sizes the lazy layers (AlexNet's first classifier layer, whose input depends on size)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
        names = [f"y{i}" for i in range(n_out)]
        axes = {n: {0: "batch"} for n in ["x", *names]} if dynamic_batch else None
        torch.onnx.export(net, (x,), path, opset_version=opset, dynamo=False,
                          input_names=["x"], output_names=names, dynamic_axes=axes)
    return path


def main(argv: list[str]) -> None:
    names = [a for a in argv if a in NETS] or list(NETS)
    extra = [a for a in argv if a not in NETS] or ["--rounds", "5", "--repeat", "5"]
    out = os.environ.get("OUT", "build/architectures")
    os.makedirs(out, exist_ok=True)
    batch = extra[extra.index("--batch") + 1] if "--batch" in extra[:-1] else None
    for name in names:
        path = os.path.join(out, f"{name}-batch.onnx" if batch else f"{name}.onnx")
        if not os.path.exists(path):
            export(name, path, dynamic_batch=batch is not None)
        print(f"== {name}", flush=True)
        result = os.path.join(out, f"{name}-b{batch}.json" if batch else f"{name}.json")
        with open(result, "w") as f:
            subprocess.run(["tvm-sparseconv", "bench", path, "--images", "skimage:astronaut", "sklearn:china", "--json",
                            *extra], stdout=f, check=True)
        subprocess.run(["tvm-sparseconv", "results", result], check=False)


if __name__ == "__main__":
    main(sys.argv[1:])
