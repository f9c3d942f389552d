"""The activation layout of each layer: NCHW or channel blocks, the transforms counted.

A layer on an algorithm with layout knobs (dense; grouped on depthwise layers) reads and
writes NCHW or blocks of the CPU's lanes (knobs ``layout_in``, ``layout_out``;
docs/algorithms.md section 16). Timed alone, a layer may be faster in blocks;
but wherever a reader takes a tensor in another layout than its writer wrote it, the model
rewrite inserts a transform (passes/rewrite_conv2d.py), and it always does at the model's
edges and before an op that needs NCHW. So the layouts are chosen for the whole model at
once, after the algorithms and tiles (docs/tuning.md, "Layouts"):

1. per workload of such a layer, each (layout_in, layout_out) pair with blocks timed alone
   (``pair_candidates``: the plan's tile in that pair, and the pair's defaults; NCHW's time is
   the selection's);
2. each transform a choice could need timed alone, once per shape and direction;
3. the assignment of pairs to layers with the least sum of layer times and transform times,
   the transforms an assignment needs counted by LayoutGraph exactly as the rewrite inserts
   them (``assign``).

The measurements are the tuner's (trials.jsonl); this module holds the choice.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping

import numpy as np

from ..algorithms import get_algorithm, supports
from ..conv import Conv2DSpec
from ..cpu import CPU
from ..layout import NCHW, lanes_layout
from ..passes import LayoutGraph

TRANSFORM = "layout"  # the trials records of transforms: {"algorithm": TRANSFORM, "knobs": {"src", "dst"}}


def pairs(cpu: CPU) -> list[tuple[str, str]]:
    """The (layout_in, layout_out) pairs a layer may take on ``cpu``: NCHW or the CPU's blocks
    for each, NCHW both first."""
    b = lanes_layout(cpu)
    return [(NCHW, NCHW), (NCHW, b), (b, NCHW), (b, b)]


def pair_candidates(spec: Conv2DSpec, knobs: Mapping, cpu: CPU,
                    algorithm: str = "dense") -> dict[tuple[str, str], list[dict]]:
    """{pair: the complete knob dicts of ``algorithm`` to time for it}: ``knobs`` (the plan's
    tile, chosen among the tiles in NCHW) with the pair's layouts, and for the pairs with
    blocks the defaults of its kernel (Algorithm.kernel_knob) in that pair (dense's gemm tiles
    differ between vectors of pixels, from NCHW, and of channels, from blocks) and the pair's
    defaults (the layer's default kernel: a 1x1 layer tuned on dense's window kernel in NCHW
    may be fastest on its gemm in blocks); those the algorithm refuses left out (an algorithm
    without layout knobs, or a layer it keeps in NCHW: every pair with blocks empty)."""
    algo = get_algorithm(algorithm)
    zeros = np.zeros(spec.w_shape, np.float32)

    def complete(k):
        try:
            full = algo.knobs(spec, k, cpu)
            algo.constants(spec, zeros, None, full)  # validates the tile for the layouts
            return full
        except (ValueError, KeyError):
            return None

    out = {}
    for lin, lout in pairs(cpu):
        pair = {"layout_in": lin, "layout_out": lout}
        found = [complete({**knobs, **pair})]
        if (lin, lout) != (NCHW, NCHW):  # the selection measured NCHW's
            kernel = {algo.kernel_knob: knobs.get(algo.kernel_knob)} if algo.kernel_knob else {}
            found.append(complete({**kernel, **pair}))
            found.append(complete(pair))  # the layer's default kernel there (dense: gemm on a 1x1 layer)
        out[(lin, lout)] = [k for i, k in enumerate(found) if k is not None and k not in found[:i]]
    return out


def layout_options(spec: Conv2DSpec, why_dense: str | None, algorithm: str, knobs: Mapping, dense_knobs: Mapping,
                   cpu: CPU, known=lambda a: True) -> dict[str, dict[tuple[str, str], list[dict]]]:
    """{algorithm: pair_candidates} to time (or predict) for one layer in the layouts phase:
    its own algorithm's, and for a sparse layer dense's too, from ``dense_knobs`` (its fastest
    NCHW knobs: dense in blocks may beat the sparse kernel in blocks, or in NCHW between
    transforms); only those that take blocks, of the algorithms ``known`` accepts."""
    out = {}
    if known(algorithm):
        out[algorithm] = pair_candidates(spec, knobs, cpu, algorithm)
    if get_algorithm(algorithm).sparse and known("dense") and supports("dense", spec, why_dense):
        out["dense"] = pair_candidates(spec, dense_knobs, cpu, "dense")
    return {a: pairs for a, pairs in out.items() if takes_blocks(pairs)}


def fastest_per_pair(algorithm: str, knobs: Mapping, nchw_ms: float | None,
                     timed: Mapping[str, Mapping[tuple[str, str], tuple[float, dict]]]) -> dict:
    """{pair: (ms, algorithm, knobs)} of one layer whose plan has ``algorithm`` with ``knobs``,
    timed at ``nchw_ms`` in NCHW: per pair the fastest of ``timed`` ({algorithm: {pair: (ms,
    knobs)}}, the layouts phase's times alone). Another algorithm than the plan's takes only
    pairs with blocks (in NCHW the tuner's selection already chose, a sparse one by a margin):
    a sparse layer may go to dense in blocks, where no transform surrounds it. ``nchw_ms`` stands for the plan's algorithm in NCHW when ``timed`` has no
    time of it there."""
    out = {}
    if algorithm not in timed and nchw_ms is not None and finite(nchw_ms):
        out[(NCHW, NCHW)] = (nchw_ms, algorithm, dict(knobs))
    for a, per_pair in timed.items():
        for pair, (ms, k) in per_pair.items():
            if a != algorithm and pair == (NCHW, NCHW):
                continue
            if ms < out.get(pair, (math.inf,))[0]:
                out[pair] = (ms, a, k)
    return out


def blocks_knobs(algorithm: str, per_pair: Mapping[tuple[str, str], tuple[float, str, dict]]) -> dict | None:
    """The knobs of ``algorithm`` in the fastest of its pairs with blocks on both sides in
    ``per_pair`` (fastest_per_pair's {pair: (ms, algorithm, knobs)}), None if it has none: what
    a layer the assignment leaves in NCHW is built with in refine's "all blocks" build. Times
    alone, and the cost model's predictions of them, miss part of what blocks save inside a
    model (VGG-16 on the Emerald Rapids: each 3x3 layer 6-27 % faster in blocks there, 9-16 %
    alone where measured, the late ones predicted 5-8 % slower), so refine checks that too."""
    both = [(ms, k) for (i, o), (ms, a, k) in per_pair.items() if a == algorithm and NCHW not in (i, o)]
    return dict(min(both, key=lambda t: t[0])[1]) if both else None


def blocked_notes(algorithm: str, per_pair: Mapping[tuple[str, str], tuple[float, str, dict]]) -> dict:
    """What a layer on ``algorithm`` that the assignment leaves in NCHW keeps in its note for
    refine's builds in blocks: "blocks_knobs" (its own algorithm in blocks: the "all blocks"
    build) and, for a sparse layer, "dense_blocks_knobs" (dense in blocks: the "sparse layers
    dense" build takes them there, where no transform surrounds them between blocked
    neighbours)."""
    notes = {"blocks_knobs": blocks_knobs(algorithm, per_pair)}
    if get_algorithm(algorithm).sparse:
        notes["dense_blocks_knobs"] = blocks_knobs("dense", per_pair)
    return {k: v for k, v in notes.items() if v is not None}


def takes_blocks(cands: Mapping[tuple[str, str], list]) -> bool:
    """pair_candidates found a candidate with channel blocks on some side."""
    return any(c for pair, c in cands.items() if pair != (NCHW, NCHW))


def assign(graph: LayoutGraph, layer_ms: Mapping[str, Mapping[tuple, float]],
           transform_ms: Callable[[tuple, str, str], float]) -> tuple[dict, float]:
    """(the assignment {key: pair} of the layers in ``layer_ms`` with the least cost found, its
    cost in ms): the layers' times (``layer_ms[key][pair]``; a pair not there cannot be taken)
    plus ``transform_ms(shape, src, dst)`` of each transform graph.transforms counts for it.

    A local search from two starts, all NCHW and all blocked (each layer its fastest blocked
    pair): a layer takes another pair when that lowers the cost; when no layer alone can, two
    neighbours (LayoutGraph.neighbours: they share a tensor) change together, which a tensor
    read in two places needs (a block's input, read by its first layer and as the residual of
    its last). Until nothing changes. The all-blocked start finds a chain of layers that pays
    only as a whole."""
    keys = [k for k in graph.keys if layer_ms.get(k)]
    near = graph.neighbours()
    couples = [(k, j) for i, k in enumerate(keys) for j in keys[i + 1:] if j in near[k]]

    def cost(a: dict) -> float:
        return sum(layer_ms[k][a[k]] for k in keys) + sum(transform_ms(*t) for t in graph.transforms(a))

    def moves(a: dict):
        for k in keys:
            for p in layer_ms[k]:
                if p != a[k]:
                    yield {**a, k: p}

    def couple_moves(a: dict):
        for k, j in couples:
            for p, q in itertools.product(layer_ms[k], layer_ms[j]):
                if p != a[k] and q != a[j]:
                    yield {**a, k: p, j: q}

    def descend(a: dict) -> tuple[dict, float]:
        best = cost(a)
        while True:
            for b in itertools.chain(moves(a), couple_moves(a)):
                c = cost(b)
                if c < best - 1e-9:
                    a, best = b, c
                    break
            else:
                return a, best

    starts = [{k: (NCHW, NCHW) if (NCHW, NCHW) in layer_ms[k] else min(layer_ms[k], key=layer_ms[k].get)
               for k in keys}]
    blocked = {k: min((p for p in layer_ms[k] if p[0] != NCHW and p[1] != NCHW), key=layer_ms[k].get,
                      default=starts[0][k]) for k in keys}
    if blocked != starts[0]:
        starts.append(blocked)
    found = [descend(dict(s)) for s in starts]
    return min(found, key=lambda f: f[1]) if found else ({}, 0.0)


def assignment_cost(graph: LayoutGraph, layer_ms: Mapping[str, Mapping[tuple, float]],
                    transform_ms: Callable[[tuple, str, str], float],
                    assignment: Mapping[str, tuple] | None = None) -> float:
    """``assign``'s cost of ``assignment`` ({key: pair}; the layers of ``layer_ms`` it leaves out
    in NCHW), the transforms at the model's edges and around other layers counted. With no
    assignment: all NCHW, the baseline a choice is compared with."""
    a = {k: (assignment or {}).get(k, (NCHW, NCHW)) for k, ms in layer_ms.items() if ms}
    return sum(layer_ms[k].get(p, math.inf) for k, p in a.items()) + sum(
        transform_ms(*t) for t in graph.transforms(a))


def blocked_outputs(algorithms: Mapping[str, str],
                    per_layer: Mapping[str, Mapping[tuple, tuple]]) -> dict[str, dict[tuple, float]]:
    """``assign``'s layer times for an assignment in which every layer writes blocks on its own
    algorithm: of ``per_layer`` ({key: fastest_per_pair's {pair: (ms, algorithm, knobs)}}) the
    pairs with blocks on the output side on ``algorithms[key]`` (the input as the times and
    transforms decide: a first layer may read the image in NCHW), the layers without one left
    out (they stay in NCHW)."""
    out = {}
    for k, per_pair in per_layer.items():
        ms = {pair: t for pair, (t, a, _) in per_pair.items() if a == algorithms[k] and pair[1] != NCHW}
        if ms:
            out[k] = ms
    return out


def finite(ms) -> bool:
    return ms is not None and math.isfinite(ms)
