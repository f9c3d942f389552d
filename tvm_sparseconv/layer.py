"""One conv layer through every algorithm: correctness, time, memory, side by side.

This is what ``tvm-sparseconv layer`` prints. Each candidate is built, checked and timed in a
child process (worker.py): one that crashes or hangs is reported as failed, the rest still run.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, asdict, field

import numpy as np

from .algorithms import ALGORITHMS, get_algorithm, knob_space
from .build import CompiledLayer
from .conv import Conv2DSpec, Epilogue, UnsupportedConvError
from .cpu import cpu_of
from .measure import Progress, max_abs_error
from .reference import dense_conv2d, im2col_lower, compression_ratios
from .target import make_target
from .worker import Cached, CandidateCrash, shared_worker


def synthesize_activation(shape, density: float, seed: int = 0, zero_channels: float = 0.05) -> np.ndarray:
    """ReLU-like NCHW activation with exactly round(density * size) non-zeros (ties aside).

    Smoothed noise thresholded at its (1 - density) quantile, so zeros are spatially
    clustered as after a real ReLU; a share of channels is all zero, as in real CNNs.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    z = rng.standard_normal(shape)
    for axis in (2, 3):  # a 3-tap box filter along each spatial axis
        z = (z + np.roll(z, 1, axis) + np.roll(z, -1, axis)) / 3.0
    dead = rng.random(c) < (zero_channels if density < 1 else 0.0)
    z[:, dead] = -np.inf
    k = int(round(density * z.size))
    if k == 0:
        return np.zeros(shape, np.float32)
    thr = np.partition(z.reshape(-1), z.size - k)[z.size - k]
    if not np.isfinite(thr):  # more non-zeros asked for than live channels hold: all of them
        thr = z[np.isfinite(z)].min()
    with np.errstate(invalid="ignore"):  # dead channels: -inf - thr, not selected
        x = np.where(z >= thr, z - thr + 0.05, 0.0)
    return x.astype(np.float32)


def synthesize_weight(spec: Conv2DSpec, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fan_in = spec.w_shape[1] * spec.kernel_h * spec.kernel_w
    return (rng.standard_normal(spec.w_shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def nonzero_macs(spec: Conv2DSpec, x: np.ndarray) -> int:
    """Multiply-accumulates with a non-zero activation: nnz(im2col(x)) * M (groups=1)."""
    if spec.groups != 1:
        return spec.macs  # not defined per group here; the dense count is the honest bound
    return int(np.count_nonzero(im2col_lower(spec, x))) * spec.out_channels


@dataclass
class Record:
    algorithm: str
    max_abs_error: float | None = None
    time_ms: float | None = None
    encode_ms: float | None = None
    multiply_ms: float | None = None
    effective_gflops: float | None = None
    dense_gflops: float | None = None
    stored_elements: int | None = None
    stored_bytes: int | None = None
    cr_vs_im2col: float | None = None
    cr_vs_mec: float | None = None
    knobs: dict = field(default_factory=dict)
    knob_trials: int = 1
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_algorithm(name: str, spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, ref: np.ndarray,
                      nz_macs: int, target=None, knobs=None, trials: int = 0, work_dir: str | None = None,
                      repeat: int = 7, log=lambda s: None, database: str | None = None, worker=None) -> Record:
    """Compile, check against ``ref``, time and account one algorithm on one layer.

    With ``trials`` > 0 its tunable stages are tuned into ``work_dir/<algorithm>``; with
    ``database`` (a folder made that way earlier), ``database/<algorithm>`` is applied if present.
    The tuning runs here (MetaSchedule isolates its own candidates); the build, check and
    timing run in ``worker`` (default: worker.shared_worker()), so that a crash or a hang
    becomes a Record whose ``error`` says what happened. Other exceptions propagate as before.
    """
    algo = get_algorithm(name)
    try:
        algo.check(spec)
    except UnsupportedConvError as e:
        return Record(name, error=str(e))
    given = database and os.path.join(database, name)
    database = given if given and os.path.isdir(given) else None
    stages = algo.stages(spec, Epilogue(), algo.knobs(spec, knobs, target), target) if trials > 0 else []
    if any(st.tunable for st in stages):
        from .tune.metaschedule import tune_stages

        work_dir = os.path.join(work_dir or tempfile.mkdtemp(prefix="tvms-ms-"), name)
        log(f"tuning {name} with MetaSchedule ({trials} trials) in {work_dir}")
        database = tune_stages(stages, make_target(target), work_dir, trials)
    try:
        return (worker or shared_worker()).call(
            measure_compiled, name, spec, Cached(x), Cached(w), Cached(ref), nz_macs, str(make_target(target)),
            knobs, database, repeat)
    except CandidateCrash as e:
        resolved = algo.knobs(spec, knobs, target)
        log(f"{name} {resolved}: candidate failed: {e}")
        return Record(name, knobs=dict(resolved), error=str(e))


def measure_compiled(name: str, spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, ref: np.ndarray, nz_macs: int,
                     target: str, knobs, database: str | None, repeat: int) -> Record:
    """The part of measure_algorithm that runs in the worker: build, check, time, account."""
    layer = CompiledLayer(name, spec, w, target=target, knobs=knobs, database=database)
    y = layer(x)
    t = layer.time(x, repeat=repeat)
    st = layer.storage()
    # algorithms that read the activation in place store nothing: no ratio to report
    cr = compression_ratios(spec, st) if st.elements else {"cr_vs_im2col": None, "cr_vs_mec": None}
    return Record(name, max_abs_error(y, ref), t.total_ms, t.encode_ms, t.multiply_ms,
                  2e-6 * nz_macs / t.total_ms, 2e-6 * spec.macs / t.total_ms, st.elements, st.bytes,
                  cr["cr_vs_im2col"], cr["cr_vs_mec"], dict(layer.knobs))


def measure_peer(peer: str, spec: Conv2DSpec, x, w, ref, nz_macs: int, threads: int, repeat: int = 7) -> Record:
    """``peer`` timed on the layer (peers.run_peer); a peer that cannot run it (peers.PeerError:
    it raised, or its process died) is a Record whose ``error`` is the one-line reason."""
    from .peers import PeerError, run_peer

    try:
        y, ms = run_peer(peer, spec, x, w, threads, repeat)
    except PeerError as e:
        return Record(peer, error=str(e))
    return Record(peer, max_abs_error(y, ref), ms, None, ms, 2e-6 * nz_macs / ms, 2e-6 * spec.macs / ms)


def knob_candidates(name: str, spec: Conv2DSpec, knob_trials: int, target=None) -> list:
    """The first ``knob_trials`` of knob_space (the defaults first, then a spread sample); [None]
    (the defaults) for one trial or a kernel without knobs."""
    return (knob_space(name, spec, target)[:knob_trials] if knob_trials > 1 else None) or [None]


def search_knobs(name: str, spec: Conv2DSpec, x, w, ref, nz_macs: int, cands: list, target=None,
                 repeat: int = 7, log=lambda s: None, step=lambda what: None, **ms) -> Record:
    """measure_algorithm on each knob dict of ``cands`` (knob_candidates; ``step`` is told after
    each); the fastest record, or the first failed one when every candidate failed. Its
    max_abs_error is the largest of every candidate's, so that one wrong candidate shows."""
    best, errors = None, []
    for knobs in cands:
        r = measure_algorithm(name, spec, x, w, ref, nz_macs, target, knobs, repeat=repeat, log=log, **ms)
        step(f"{name} {r.knobs}: {r.error or f'{r.time_ms:.3f} ms'}")
        errors += [r.max_abs_error] if r.max_abs_error is not None else []
        if best is None or (r.time_ms is not None and (best.time_ms is None or r.time_ms < best.time_ms)):
            best = r
    best.knob_trials = len(cands)
    if errors:
        best.max_abs_error = max(errors)
    return best


def run_layer(spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, algorithms=ALGORITHMS, target=None,
              threads: int = 0, trials: int = 0, work_dir: str | None = None, peers=(), repeat: int = 7,
              log=lambda s: None, database: str | None = None, knob_trials: int = 1,
              progress: bool = False) -> dict:
    """Every algorithm (and peer) on one layer; returns {"layer", "density", ..., "results": [...]}.
    An algorithm that does not support the layer, a candidate that crashed and a peer that
    cannot run the layer are results with ``error`` set; the others still run.

    A hand-scheduled kernel runs its first ``knob_trials`` knob candidates (search_knobs) and
    reports the fastest. ``progress``: a progress line with ETA on stderr, one step per run."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    if x.shape != spec.x_shape or w.shape != spec.w_shape:
        raise ValueError(f"input {x.shape} / weight {w.shape} do not match {spec.x_shape} / {spec.w_shape}")
    ref = dense_conv2d(spec, x, w)
    nz = nonzero_macs(spec, x)
    cands = {a: knob_candidates(a, spec, knob_trials, target) for a in algorithms}
    step = Progress("layer", sum(map(len, cands.values())) + len(peers)).step if progress else (lambda what: None)
    results = []
    for name in algorithms:
        results.append(search_knobs(name, spec, x, w, ref, nz, cands[name], target, repeat, log, step,
                                    trials=trials, work_dir=work_dir, database=database))
    for p in peers:
        results.append(measure_peer(p, spec, x, w, ref, nz, threads, repeat))
        step(f"{p}: {results[-1].error or f'{results[-1].time_ms:.3f} ms'}")
    return {"layer": spec.to_dict(), "density": float(np.count_nonzero(x)) / x.size, "nonzero_macs": nz,
            "dense_macs": spec.macs, "cpu": cpu_of(target).to_dict(), "threads": threads, "trials": trials,
            "knob_trials": knob_trials,
            "results": [r.to_dict() for r in results]}
