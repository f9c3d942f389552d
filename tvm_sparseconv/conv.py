"""One conv2d layer: shapes, attributes and their validation.

Every algorithm, the NumPy reference and the CLI describe a layer with a
:class:`Conv2DSpec`. Layout is NCHW for the activation (N x C x H x W) and
OIHW for the weight (M x C/G x Kh x Kw); the output is N x M x Oh x Ow.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Sequence


class ConvSpecError(ValueError):
    """The layer description is malformed (wrong ranks, mismatched channels, negative padding...)."""


class UnsupportedConvError(ValueError):
    """An algorithm cannot compute this layer; the message names the attribute.

    Model-level code catches it and falls back to the dense path.
    """


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ConvSpecError(f"{name} must be an int or 2 ints, got {v}")
    return v


def normalize_padding(padding) -> tuple[int, int, int, int]:
    """int | (ph, pw) | (top, left, bottom, right) -> (top, left, bottom, right)."""
    if isinstance(padding, int):
        p = (padding,) * 4
    else:
        p = tuple(int(a) for a in padding)
        if len(p) == 1:
            p = p * 4
        elif len(p) == 2:
            p = (p[0], p[1], p[0], p[1])
        elif len(p) != 4:
            raise ConvSpecError(f"padding must have 1, 2 or 4 values, got {p}")
    if min(p) < 0:
        raise ConvSpecError(f"negative padding is not a convolution: {p}")
    return p


@dataclass(frozen=True)
class Conv2DSpec:
    """A conv2d layer. ``padding`` is (top, left, bottom, right)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def from_shapes(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride=1, padding=0,
                    dilation=1, groups: int = 1) -> "Conv2DSpec":
        """Build from an NCHW activation shape and an OIHW weight shape, validating both."""
        x_shape, w_shape = tuple(int(a) for a in x_shape), tuple(int(a) for a in w_shape)
        if len(x_shape) != 4:
            raise ConvSpecError(f"activation must be 4-D NCHW, got shape {x_shape}")
        if len(w_shape) != 4:
            raise ConvSpecError(f"weight must be 4-D OIHW, got shape {w_shape}")
        n, c, h, w = x_shape
        m, cg, kh, kw = w_shape
        groups = int(groups)
        if groups < 1 or c % groups or m % groups:
            raise ConvSpecError(f"groups={groups} must divide in_channels={c} and out_channels={m}")
        if cg * groups != c:
            raise ConvSpecError(
                f"weight has {cg} input channels per group x {groups} groups but the activation has {c} channels")
        spec = cls(n, c, h, w, m, kh, kw, _pair(stride, "stride"), normalize_padding(padding),
                   _pair(dilation, "dilation"), groups)
        spec.validate()
        return spec

    def validate(self) -> None:
        if min(self.batch, self.in_channels, self.height, self.width, self.out_channels,
               self.kernel_h, self.kernel_w) < 1:
            raise ConvSpecError(f"every dimension must be positive: {self}")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ConvSpecError(f"stride and dilation must be >= 1: {self.stride}, {self.dilation}")
        if min(self.padding) < 0:
            raise ConvSpecError(f"negative padding: {self.padding}")
        if self.out_h < 1 or self.out_w < 1:
            raise ConvSpecError(
                f"kernel {self.kernel_h}x{self.kernel_w} (dilation {self.dilation}) does not fit the padded "
                f"input {self.padded_h}x{self.padded_w}")

    # derived sizes ---------------------------------------------------------------------------
    @property
    def padded_h(self) -> int:
        return self.height + self.padding[0] + self.padding[2]

    @property
    def padded_w(self) -> int:
        return self.width + self.padding[1] + self.padding[3]

    @property
    def out_h(self) -> int:
        return (self.padded_h - self.dilation[0] * (self.kernel_h - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.padded_w - self.dilation[1] * (self.kernel_w - 1) - 1) // self.stride[1] + 1

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates of the layer."""
        return (self.batch * self.out_channels * self.out_h * self.out_w
                * (self.in_channels // self.groups) * self.kernel_h * self.kernel_w)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Conv2DSpec":
        d = dict(d)
        for k in ("stride", "dilation"):
            d[k] = tuple(d[k])
        d["padding"] = normalize_padding(d["padding"])
        spec = cls(**d)
        spec.validate()
        return spec

    def require(self, algorithm: str, *, groups: bool = False, dilation: bool = True) -> None:
        """Raise UnsupportedConvError naming the first attribute ``algorithm`` does not support."""
        if not groups and self.groups != 1:
            raise UnsupportedConvError(f"{algorithm} does not support groups={self.groups} (only groups=1)")
        if not dilation and self.dilation != (1, 1):
            raise UnsupportedConvError(f"{algorithm} does not support dilation={self.dilation}")


@dataclass(frozen=True)
class Epilogue:
    """What is applied to the accumulators before they are stored, in this order: + bias[m],
    + res[n, m, r, s] (a residual input of y's shape, when the graph adds one), then
    max(., 0) with ``relu`` (v * slope instead of 0 below 0 with ``slope``: LeakyReLU), then
    min(., clip) with ``clip`` (ReLU6 is relu and clip 6.0; any clip(0, a) is relu and clip
    a). NaN passes both bounds, as in the graph's own ops.

    ``gate``, instead of relu and clip, multiplies v by a gate of itself (GATES):
    v * clip(v * HARD_SIGMOID[0] + HARD_SIGMOID[1], 0, 1) with ``"hard_sigmoid"`` (hard-swish,
    as ONNX's HardSwish), v * sigmoid(v) with ``"sigmoid"`` (SiLU, or swish; tir_math's
    sigmoid)."""

    bias: bool = False
    relu: bool = False
    residual: bool = False
    clip: float | None = None
    gate: str | None = None
    slope: float | None = None

    def __post_init__(self):
        if self.clip is not None and not (self.relu and float(self.clip) > 0):
            raise ConvSpecError(f"clip={self.clip}: an epilogue clips to [0, a] with relu=True and a > 0")
        if self.gate is not None and (self.gate not in GATES or self.relu):
            raise ConvSpecError(f"gate={self.gate!r}: an epilogue's gate is one of {GATES}, without relu")
        if self.slope is not None and not (self.relu and self.clip is None and 0 < float(self.slope) < 1):
            raise ConvSpecError(f"slope={self.slope}: a LeakyReLU's slope is in (0, 1), with relu=True and no clip")


# the gates an epilogue may multiply its output by (Epilogue.gate)
GATES = ("hard_sigmoid", "sigmoid")
# hard_sigmoid(v) = clip(v * alpha + beta, 0, 1): ONNX's HardSwish's (alpha, beta), alpha as the
# float32 nearest 1/6, which its importers write
HARD_SIGMOID = (0.1666666716337204, 0.5)
