"""Conv workloads of a model: identical layers (shape, attributes, epilogue) are tuned once."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..conv import Conv2DSpec, Epilogue
from ..graph import ConvSite
from ..reference.dense import dense_conv2d


@dataclass
class Workload:
    """Layers sharing one spec and epilogue, with the real activation the tuner measures on.

    ``x`` is the recorded conv input (N x C x H x W) whose density is the median over the
    workload's layers and samples; ``weight``/``bias`` are the first layer's (time does not
    depend on the weight values).
    """

    id: str
    spec: Conv2DSpec
    relu: bool
    keys: list
    weight: np.ndarray
    bias: np.ndarray | None
    x: np.ndarray
    density: float
    densities: list = field(default_factory=list)
    why_dense: str | None = None
    clip: float | None = None
    gate: str | None = None
    slope: float | None = None

    @property
    def epilogue(self) -> Epilogue:
        """Bias, ReLU (leaky with a slope) and clip or the gate as the layers have them (a
        workload's candidates never fuse a residual)."""
        return Epilogue(bias=self.bias is not None, relu=self.relu, clip=self.clip, gate=self.gate, slope=self.slope)

    def reference(self) -> np.ndarray:
        """The layer's output on ``x`` in NumPy float64 (rounded to float32): what every candidate
        is checked against."""
        return dense_conv2d(self.spec, self.x, self.weight, self.bias, self.relu, clip=self.clip, gate=self.gate,
                            slope=self.slope)


def workload_id(site: ConvSite) -> str:
    return spec_workload_id(site.spec, site.bias is not None, site.relu, site.clip, site.gate, site.slope)


def spec_workload_id(s: Conv2DSpec, bias: bool, relu: bool, clip: float | None, gate: str | None = None,
                     slope: float | None = None) -> str:
    """The workload of a layer with spec ``s`` and that epilogue (as a profile.json layer has it)."""
    return (f"{s.batch}x{s.in_channels}x{s.height}x{s.width}-m{s.out_channels}-k{s.kernel_h}x{s.kernel_w}"
            f"-s{s.stride[0]}x{s.stride[1]}-p{'.'.join(map(str, s.padding))}-d{s.dilation[0]}x{s.dilation[1]}"
            f"-g{s.groups}{'-bias' if bias else ''}{'-relu' if relu else ''}"
            f"{f'-clip{clip:g}' if clip is not None else ''}{f'-{gate}' if gate else ''}"
            f"{f'-leaky{slope:g}' if slope is not None else ''}")


def extract_workloads(sites: list[ConvSite], activations: list[list[np.ndarray]]) -> list[Workload]:
    """Group layers into workloads; ``activations[i]`` are layer i's recorded inputs (one per sample)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sites):
        groups.setdefault(workload_id(s), []).append(i)
    out = []
    for wid, idx in groups.items():
        cands = [(float(np.count_nonzero(a)) / a.size, i, j) for i in idx for j, a in enumerate(activations[i])]
        cands.sort()
        d, i, j = cands[len(cands) // 2]
        s = sites[idx[0]]
        out.append(Workload(wid, s.spec, s.relu, [sites[k].key for k in idx], s.weight, s.bias,
                            activations[i][j], d, [c[0] for c in cands], s.why_dense, s.clip, s.gate, s.slope))
    return out
