"""The tuning report of a run folder: report.md with a table per layer, and PNG plots."""
from __future__ import annotations

import json
import os

from .log import TuningLog


def _load(run_dir: str):
    paths = {k: os.path.join(run_dir, f) for k, f in
             (("profile", "profile.json"), ("plan", "plan.json"), ("trials", "trials.jsonl"))}
    for k, p in paths.items():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{run_dir} is not a finished tuning run: {os.path.basename(p)} is missing")
    log = TuningLog.read(paths["trials"])
    with open(paths["profile"]) as f:
        prof = json.load(f)
    from ..plan import Plan

    return prof, Plan.load(paths["plan"]), log


def _nchw(r: dict) -> bool:
    """A measurement of a conv candidate with x and y in NCHW (not a layout transform, nor a
    dense layer in channel blocks, which the layouts section shows)."""
    from ..algorithms import ALGORITHMS

    knobs = r["knobs"]
    return r["algorithm"] in ALGORITHMS and knobs.get("layout_in", "nchw") == knobs.get("layout_out", "nchw") == "nchw"


def best_per_algorithm(records, workload: str) -> dict:
    """{algorithm: its fastest measurement of ``workload`` with x and y in NCHW}."""
    out = {}
    for r in records:
        if r["workload"] == workload and r.get("time_ms") and _nchw(r):
            if r["algorithm"] not in out or r["time_ms"] < out[r["algorithm"]]["time_ms"]:
                out[r["algorithm"]] = r
    return out


def write_report(run_dir: str) -> str:
    """Write report.md and plots into ``run_dir``; returns the report's path."""
    prof, plan, log = _load(run_dir)
    dens = {l["key"]: l for l in prof["layers"]}
    algos = sorted({r["algorithm"] for r in log.records if r.get("time_ms") and _nchw(r)})
    rows, series = [], {a: [] for a in algos}
    mem = {a: [] for a in algos}
    keys, densities = [], []
    total_plan = total_dense = 0.0
    for pl in plan.layers:
        w = pl.note.get("workload")
        best = best_per_algorithm(log.records, w) if w else {}
        d = dens.get(pl.key, {})
        keys.append(pl.key)
        densities.append(d.get("density_mean", float("nan")))
        for a in algos:
            series[a].append(best[a]["time_ms"] if a in best else float("nan"))
            mem[a].append(best[a].get("stored_bytes", 0) / 1e6 if a in best else float("nan"))
        dense_ms = min([best[a]["time_ms"] for a in ("dense", "direct") if a in best] or [float("nan")])
        chosen_ms = pl.note.get("time_ms") or (best[pl.algorithm]["time_ms"] if pl.algorithm in best else float("nan"))
        if chosen_ms == chosen_ms and dense_ms == dense_ms:
            total_plan += chosen_ms
            total_dense += dense_ms
        rows.append((pl, d, best, chosen_ms, dense_ms))
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(f"# Tuning report: {log.header.get('model')}\n\n")
        f.write(f"Target `{log.header.get('target')}`; {prof.get('samples')} samples; "
                f"{len(log.records)} measured candidates.\n\n")
        if total_dense:
            f.write(f"Sum of conv layer times: chosen {total_plan:.2f} ms vs best dense {total_dense:.2f} ms "
                    f"({total_dense / total_plan:.2f}x).\n\n")
        f.write("![time per algorithm](time_per_layer.png)\n\n![density](density_per_layer.png)\n\n"
                "![memory](memory_per_algorithm.png)\n\n")
        f.write("| layer | shape | density | MMACs | " + " | ".join(f"{a} ms" for a in algos)
                + " | choice | speed-up vs dense |\n")
        f.write("|---|---|---|---|" + "---|" * len(algos) + "---|---|\n")
        for pl, d, best, chosen_ms, dense_ms in rows:
            s = pl.spec
            shape = f"{s['in_channels']}x{s['height']}x{s['width']}->{s['out_channels']} k{s['kernel_h']}x{s['kernel_w']}" \
                    f" s{s['stride'][0]}"
            cells = [f"{best[a]['time_ms']:.3f}" if a in best else "-" for a in algos]
            sp = f"{dense_ms / chosen_ms:.2f}x" if chosen_ms == chosen_ms and dense_ms == dense_ms else "-"
            f.write(f"| {pl.key} | {shape} | {d.get('density_mean', float('nan')):.3f} | "
                    f"{d.get('macs', 0) / 1e6:.1f} | " + " | ".join(cells) + f" | {pl.algorithm} | {sp} |\n")
        _layouts_section(f, run_dir)
        _refine_section(f, run_dir)
    _plots(run_dir, keys, densities, series, mem)
    return os.path.join(run_dir, "report.md")


def _layouts_section(f, run_dir: str) -> None:
    """The layers' layouts (layouts.json), when the run chose them."""
    path = os.path.join(run_dir, "layouts.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as g:
            lay = json.load(g)
        blocked = {k: v for k, v in lay["layouts"].items() if v != ["nchw", "nchw"]}
        moves = lay["transforms"]
    except (ValueError, KeyError, TypeError):
        f.write("\nlayouts.json is unreadable: the layouts phase runs again on --resume.\n")
        return
    f.write(f"\n## Layouts: NCHW or channel blocks\n\n{len(blocked)} of {len(lay['layouts'])} layers with layout "
            f"knobs read or write channel blocks; {len(moves)} layout transforms "
            f"({sum(t['ms'] for t in moves):.3f} ms). Those layers and transforms, each timed alone: "
            f"{lay['ms']:.2f} ms, against {lay['nchw_ms']:.2f} ms with every layer in NCHW.\n\n")
    if blocked:
        f.write("| layer | layout in -> out |\n|---|---|\n")
        for k, (i, o) in blocked.items():
            f.write(f"| {k} | {i} -> {o} |\n")


def _refine_section(f, run_dir: str) -> None:
    """The refine phase's builds (refine.json), when the run has one."""
    path = os.path.join(run_dir, "refine.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as g:
            ref = json.load(g)
        if "progress" in ref:
            done = ref["progress"]["builds"]
            f.write(f"\nRefine did not finish ({len(done)} builds compiled): `--resume` goes on from refine.json.\n")
            return
        builds, rounds = ref["builds"], ref.get("round_ms", {})
    except (ValueError, KeyError, TypeError):
        f.write("\nrefine.json is unreadable: the refine phase runs again on --resume.\n")
        return
    if not builds:
        f.write(f"\nRefine: nothing to do ({ref.get('why', '')}).\n")
        return
    f.write("\n## Refine: the dense layers' thread splits, and sparse or dense, inside the model\n\n"
            "| build | end to end ms (median) | per round / plan | conv calls in the model ms | all calls ms |\n"
            "|---|---|---|---|---|\n")
    base = rounds.get("plan")
    for b in builds:
        r = rounds.get(b["name"])
        ratio = "-" if not (r and base) else \
            f"{min(x / y for x, y in zip(r, base)):.3f}-{max(x / y for x, y in zip(r, base)):.3f}"
        mark = " (chosen)" if b["name"] == ref.get("chosen") else ""
        e2e = "left out of the rounds" if b["ms"] is None else f"{b['ms']:.2f}"
        every = f"{b['calls_ms']:.2f}" if "calls_ms" in b else "-"  # not in a report from before the field
        f.write(f"| {b['name']}{mark} | {e2e} | {ratio} | {sum(b['layer_ms'].values()):.2f} | {every} |\n")
    if ref.get("dense"):
        f.write(f"\nSparse layers the chosen build runs dense (faster so inside the model): "
                f"{', '.join(ref['dense'])}.\n")


def _figure(run_dir, keys, name, title, ylabel, draw, height=4.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.3), height))
    draw(ax, range(len(keys)))
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=6)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, name), dpi=110)
    plt.close(fig)


def _plots(run_dir, keys, densities, series, mem) -> None:
    def lines(data, log=False):
        def draw(ax, x):
            for a, ys in data.items():
                if any(v == v and v > 0 for v in ys):
                    ax.plot(list(x), ys, marker="o", ms=3, label=a)
            if log:
                ax.set_yscale("log")
        return draw

    def bars(ax, x):
        ax.bar(list(x), densities, color="tab:green")
        ax.set_ylim(0, 1)

    _figure(run_dir, keys, "time_per_layer.png", "time per algorithm per layer", "ms (encode + multiply)",
            lines(series, log=True))
    _figure(run_dir, keys, "density_per_layer.png", "input density per conv layer", "input density", bars, 3.5)
    _figure(run_dir, keys, "memory_per_algorithm.png", "memory per algorithm per layer",
            "stored MB (representation of the input)", lines(mem), 4)
