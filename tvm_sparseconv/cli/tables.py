"""What the commands print: text tables and lines from their result dicts.

Nothing here measures, compiles or loads: a printer gets what a command's library call returned
(the same dict its ``--json`` prints) and lays it out.
"""
from __future__ import annotations

import json
import os

from ..cpu import CPU

PEERS = ("onnxruntime", "pytorch")  # the rows of a ``layer`` report that are not our algorithms


def fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.{nd}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def cpu_line(cpu: dict) -> str:
    """The CPU a table ran on, for its header (a cpu.CPU as a dict)."""
    return str(CPU.from_dict(cpu))


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


# -- layer ------------------------------------------------------------------------------------

def print_layer_table(report: dict) -> None:
    """layer.run_layer's report."""
    spec = report["layer"]
    print(f"layer N={spec['batch']} C={spec['in_channels']} H={spec['height']} W={spec['width']} "
          f"M={spec['out_channels']} k={spec['kernel_h']}x{spec['kernel_w']} stride={tuple(spec['stride'])} "
          f"pad={tuple(spec['padding'])} dil={tuple(spec['dilation'])} | density {report['density']:.3f} | "
          f"threads {report['threads']} | MetaSchedule trials {report['trials']}")
    if report.get("cpu"):
        print(f"cpu {cpu_line(report['cpu'])}")
    cols = [("algorithm", "algorithm", 0), ("max_abs_error", "max err", 6), ("time_ms", "total ms", 3),
            ("encode_ms", "encode ms", 3), ("multiply_ms", "mult ms", 3), ("effective_gflops", "eff GF/s", 1),
            ("dense_gflops", "dense GF/s", 1), ("stored_elements", "stored el", 0), ("stored_bytes", "bytes", 0),
            ("cr_vs_im2col", "CR/im2col", 2), ("cr_vs_mec", "CR/MEC", 2)]
    rows = [[h for _, h, _ in cols]]
    for r in report["results"]:
        if r.get("error"):  # a one-line reason instead of the numbers
            why = "skipped" if r["algorithm"] in PEERS else "unsupported"
            rows.append([r["algorithm"], f"{why}: {r['error']}"])
        else:
            rows.append([fmt(r[k], nd) if k != "algorithm" else r[k] for k, _, nd in cols])
    widths = [max(len(row[i]) for row in rows if len(row) == len(cols)) for i in range(len(cols))]
    for row in rows:
        if len(row) < len(cols):
            print(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
    ok = [r for r in report["results"] if r.get("time_ms")]
    if ok:
        best = min(ok, key=lambda r: r["time_ms"])
        knobs = f", knobs {best['knobs']}" if best.get("knobs") else ""
        print(f"fastest: {best['algorithm']} ({best['time_ms']:.3f} ms{knobs})")


# -- profile ----------------------------------------------------------------------------------

def print_profile_table(res: dict, layout: str) -> None:
    """``profile --json``'s dict (model, input_shape, samples, layers: LayerProfile dicts); the
    model's ``layout`` for the header."""
    layers = res["layers"]
    print(f"{res['model']}: {len(layers)} conv layers, {res['samples']} samples, input "
          f"{tuple(res['input_shape'])} {layout}")
    hdr = ["layer", "input CxHxW", "M", "kernel", "stride", "padding", "MMACs", "density", "+-", "min", "max",
           "zero ch", "fused", "note"]
    rows = [hdr]
    for l in layers:
        s = l["spec"]
        rows.append([l["key"], f"{s['in_channels']}x{s['height']}x{s['width']}", str(s["out_channels"]),
                     f"{s['kernel_h']}x{s['kernel_w']}", "x".join(map(str, s["stride"])),
                     ",".join(map(str, s["padding"])), f"{l['macs'] / 1e6:.1f}", f"{l['density_mean']:.3f}",
                     f"{l['density_std']:.3f}", f"{l['density_min']:.3f}", f"{l['density_max']:.3f}",
                     f"{l['zero_channel_share']:.3f}", ("bias" if l["bias"] else "") + ("+relu" if l["relu"] else ""),
                     l["why_dense"] or ""])
    w = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    for r in rows:
        print("  ".join(c.ljust(w[i]) if i in (0, 13) else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
    # the table's totals: all MACs, and those with a non-zero input at each layer's mean density
    macs = sum(l["macs"] for l in layers)
    eff = sum(l["macs"] * l["density_mean"] for l in layers)
    print(f"total {macs / 1e9:.2f} GMACs; at the measured densities {eff / 1e9:.2f} GMACs have a non-zero input "
          f"({100 * eff / macs:.0f}%)")


# -- compile, run -----------------------------------------------------------------------------

def print_compiled(output: str, counts: str) -> None:
    """compile: the library written and Build.counts() of what it computes."""
    print(f"wrote {output} (+ {os.path.basename(output)}.json); layers: {counts}")


def print_run(name: str, latency_ms: float, output_shape, top: list | None) -> None:
    """run, one input: its median latency, then the top-k (label, score) or the output's shape."""
    print(f"{name}: median latency {latency_ms:.2f} ms")
    if top is not None:
        for label, score in top:
            print(f"  {score:9.5f}  {label}")
    else:
        print(f"  output shape {output_shape}")


# -- bench, refine ----------------------------------------------------------------------------

def print_bench_table(res: dict, repeat: int) -> None:
    """bench.bench_model's result with the bench command's fields (model, input_shape, cpu);
    ``repeat``: the timed runs per median."""
    rounds = res["rounds"]
    spread = rounds > 1
    what = f"; {rounds} rounds in turn: median round, ratios per round" if spread else ""
    print(f"{res['model']}: input {tuple(res['input_shape'])}, {res['threads']} threads, median of {repeat} runs"
          f"{what}")
    print(f"cpu {cpu_line(res['cpu'])}")
    print(f"{'':32} {'median ms':>10} {'plan speed-up':>14}{'  (min-max)' if spread else ''} {'max err':>9}  layers")
    for r in res["rows"]:
        if r.get("skipped"):  # a peer that could not run the model
            print(f"{r['name']:32} skipped: {r['skipped']}")
            continue
        lo, hi = r["plan_speedup_range"]
        print(f"{r['name']:32} {r['ms']:10.2f} {r['plan_speedup']:13.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if spread else "")
              + f" {fmt(r['max_abs_error'], 6):>9}  {r['layers']}")
    print(f"plan vs the best of the others: {res['speedup_vs_best']:.2f}x")
    if "ops" in res:
        print("inside the plan's build, mean ms per inference (each call timed by a VM instrument):")
        for kind, ms in res["ops"].items():
            print(f"  {kind:30} {ms:8.3f}")
        print(f"  {'sum':30} {sum(res['ops'].values()):8.3f}")


def print_refined(model: str, report: dict, rounds: int, output: str) -> None:
    """refine: tune.refine.refine_plan's report; ``output`` is the plan written."""
    if not report["builds"]:
        print(f"{report['why']}: wrote the plan unchanged to {output}")
        return
    print(f"{model}: end to end, median of {rounds} interleaved rounds")
    for b in report["builds"]:
        print(f"  {b['name']:16} {b['ms']:8.2f} ms  conv calls in the model {sum(b['layer_ms'].values()):7.2f} ms"
              + ("  <- chosen" if b["name"] == report["chosen"] else ""))
    print(f"wrote {output} (+ .refine.json: per-layer in-model ms of every build)")


# -- tune, report -----------------------------------------------------------------------------

def print_tuned(model: str, run_dir: str, algorithms: list[str], database: str | None) -> None:
    """tune: where the plan (whose layers have ``algorithms``) and its report are, and the next
    command (with ``database``, the run's MetaSchedule database, if it wrote one)."""
    counts = {}
    for a in algorithms:
        counts[a] = counts.get(a, 0) + 1
    print(f"plan: {os.path.join(run_dir, 'plan.json')} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    print(f"report: {os.path.join(run_dir, 'report.md')}")
    print(f"next: tvm-sparseconv compile {model} --plan {os.path.join(run_dir, 'plan.json')}"
          + (f" --database {database}" if database else "") + " -o model.so")


def print_wrote(path: str) -> None:
    print(f"wrote {path}")


# -- algorithms -------------------------------------------------------------------------------

ALGORITHM_HEADER = ["algorithm", "kind", "tuned by", "fuses residual add", "groups", "knobs", "description"]


def _algorithm_cells(r: dict, code=lambda s: s) -> list[str]:
    """One registry row (commands.cmd_algorithms) as table cells; ``code`` marks names up."""
    tuned = "MetaSchedule" if r["metaschedule"] else ("knobs" if r["knobs"] else "-")
    return [code(r["name"]), "sparse" if r["sparse"] else "dense", tuned, "yes" if r["fuses_residual"] else "no",
            "yes" if r["groups"] else "no", ", ".join(map(code, r["knobs"])) or "-", r["description"]]



def print_algorithms(rows: list[dict], spec: dict, cpu: dict) -> None:
    """algorithms: the registry as a text table; the knobs are the default knob dict's names for
    the layer ``spec`` on ``cpu``."""
    table = [ALGORITHM_HEADER] + [_algorithm_cells(r) for r in rows]
    w = [max(len(r[i]) for r in table) for i in range(len(ALGORITHM_HEADER))]
    for r in table:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    print(f"knobs: the default knobs of a {spec['in_channels']} -> {spec['out_channels']} "
          f"{spec['kernel_h']}x{spec['kernel_w']} layer at {spec['height']}x{spec['width']} on {cpu_line(cpu)}")


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A GitHub markdown table; columns in ``right`` are right-aligned (numbers)."""
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def print_algorithms_markdown(rows: list[dict]) -> None:
    """algorithms --markdown: the same table as GitHub markdown, nothing else."""
    print(markdown_table(ALGORITHM_HEADER, [_algorithm_cells(r, lambda s: f"`{s}`") for r in rows]))


# -- results ----------------------------------------------------------------------------------

def print_text(text: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n")


def results_header(files: list[str]) -> str:
    """The first line of a file ``results -o`` writes: the folders of its files, not each one."""
    import os

    folders = sorted({os.path.dirname(f) or "." for f in files})
    return (f"Generated by `tvm-sparseconv results` from the {len(files)} JSON files in "
            f"{', '.join(folders)}: run it again rather than editing this file.")


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if v >= 1 else f"{v:.3f}")


def _shape(v) -> str:
    return "x".join(map(str, v)) if v else "-"


def _compact(v) -> str:
    """(1, 1) -> "1", (1, 0, 2, 1) -> "1,0,2,1"."""
    v = list(v)
    return str(v[0]) if len(set(v)) == 1 else ",".join(map(str, v))


def layer_label(spec: dict) -> str:
    """A Conv2DSpec dict as "1x64x56x56 -> 64, 3x3, stride 1, pad 1" (dilation and groups when
    not 1)."""
    s = (f"{spec['batch']}x{spec['in_channels']}x{spec['height']}x{spec['width']} -> {spec['out_channels']}, "
         f"{spec['kernel_h']}x{spec['kernel_w']}, stride {_compact(spec['stride'])}, pad {_compact(spec['padding'])}")
    if set(spec["dilation"]) != {1}:
        s += f", dilation {_compact(spec['dilation'])}"
    if spec.get("groups", 1) != 1:
        s += f", groups {spec['groups']}"
    return s


def _bench_section(saved: list[tuple[str, dict]]) -> list[str]:
    """One table of ``bench --json`` results (one CPU): a row per model, a column per build/peer."""
    names = []
    for _, d in saved:
        names += [r["name"] for r in d["rows"] if r["name"] not in names]
    header = (["model", "input", "threads", "rounds"] + [f"{n} ms" for n in names]
              + ["plan speed-up over the best other"])
    rows = []
    for path, d in saved:
        ms = {r["name"]: r["ms"] for r in d["rows"]}
        rows.append([d.get("model") or path, _shape(d.get("input_shape")), fmt(d.get("threads")),
                     fmt(d.get("rounds"))] + [_ms(ms.get(n)) for n in names] + [f"{d['speedup_vs_best']:.2f}x"])
    out = ["### End to end (`bench`)", "",
           markdown_table(header, rows, set(range(2, len(header)))), ""]
    return out + _commands(saved, lambda d: d.get("model"))


def _layer_section(saved: list[tuple[str, dict]]) -> list[str]:
    """The ``layer --json`` results of one CPU: a summary, one row per layer and density (the
    fastest algorithm, encode included, against the fastest peer of that layer over all its
    densities: a dense peer's time does not depend on the density, so one slow peer run does not
    flatter the ratio), then a row per layer and algorithm or peer with its speed-up over the
    fastest dense one (a dense algorithm or a peer) of the same run."""
    from ..algorithms import SPARSE

    def ok(d):
        return [r for r in d["results"] if r.get("time_ms") and not r.get("error")]

    best_peer: dict[str, dict] = {}
    for _, d in saved:
        for r in ok(d):
            key = layer_label(d["layer"])
            if r["algorithm"] in PEERS and (key not in best_peer or r["time_ms"] < best_peer[key]["time_ms"]):
                best_peer[key] = r
    summary = []
    for _, d in saved:
        ours = [r for r in ok(d) if r["algorithm"] not in PEERS]
        if not ours:
            continue
        b, p = min(ours, key=lambda r: r["time_ms"]), best_peer.get(layer_label(d["layer"]))
        summary.append([layer_label(d["layer"]), f"{d['density']:.3f}", b["algorithm"], _ms(b["time_ms"]),
                        fmt(b.get("effective_gflops"), 0), f"{p['algorithm']} {_ms(p['time_ms'])}" if p else "-",
                        f"{p['time_ms'] / b['time_ms']:.2f}x" if p else "-"])
    header = ["layer", "density", "threads", "algorithm", "ms", "speed-up vs the fastest dense"]
    rows = []
    for _, d in saved:
        dense = [r["time_ms"] for r in ok(d) if r["algorithm"] not in SPARSE]
        ref = min(dense) if dense else None
        for r in d["results"]:
            t = r.get("time_ms") if not r.get("error") else None
            rows.append([layer_label(d["layer"]), f"{d['density']:.3f}", fmt(d.get("threads")), r["algorithm"],
                         _ms(t), f"{ref / t:.2f}x" if ref and t else "-"])
    out = ["### Layers (`layer`)", ""]
    if summary:
        out += ["The fastest algorithm per layer and density (encode included; effective GFLOP/s counts "
                "only the multiplies with a non-zero input) against the fastest peer:", "",
                markdown_table(["layer", "density", "fastest", "ms", "eff. GFLOP/s", "fastest peer ms",
                                "speed-up"], summary, {1, 3, 4, 5, 6}), "",
                "Every algorithm:", ""]
    out += [markdown_table(header, rows, {1, 2, 4, 5}), ""]
    return out + _commands(saved, lambda d: layer_label(d["layer"]))


def _commands(saved, label) -> list[str]:
    """The command line behind each row (or set of rows), where the file records it."""
    cmds = [(label(d) or path, d["command"]) for path, d in saved if d.get("command")]
    if not cmds:
        return []
    return ["Commands:", ""] + [f"- {what}: `{cmd}`" for what, cmd in cmds] + [""]


def results_markdown(saved: list[tuple[str, str, dict]]) -> str:
    """Saved results, (path, "bench" or "layer", dict) each, as markdown: a section per CPU
    (the ``cpu`` dict each recorded; "CPU not recorded" for files without it), its ``bench``
    table then its ``layer`` table, in the order of the files."""
    groups: dict[str, dict[str, list]] = {}
    for path, kind, d in saved:
        cpu = cpu_line(d["cpu"]) if d.get("cpu") else "CPU not recorded"
        groups.setdefault(cpu, {"bench": [], "layer": []})[kind].append((path, d))
    out = []
    for cpu, by_kind in groups.items():
        out += [f"## {cpu}", ""]
        if by_kind["bench"]:
            out += _bench_section(by_kind["bench"])
        if by_kind["layer"]:
            out += _layer_section(by_kind["layer"])
    return "\n".join(out).rstrip("\n") + "\n"


# -- fuzz -------------------------------------------------------------------------------------

def print_fuzz_failure(case: dict) -> None:
    """One failing case of a fuzz campaign (fuzz.failure_case), as it is found: two lines."""
    what = case["error"] if case["status"] == "error" else \
        f"max abs error {fmt(case['max_abs_error'], 4)} > {case['tolerance']:.2g}: {case['error']}"
    print(f"{case['status'].upper()} layer {case['layer']} (seed {case['layer_seed']}) {case['algorithm']} "
          f"{case['knobs']}: {what}")
    print(f"  {case['description']}; rerun: {case['rerun']}", flush=True)


def print_fuzz_summary(res: dict) -> None:
    """A campaign's end (fuzz.CampaignResult.to_dict): build seconds by algorithm and the rate on
    stderr, then the summary as the last line on stdout."""
    import sys

    secs = sorted(res["seconds_by_algorithm"].items(), key=lambda kv: -kv[1])
    if secs:
        print("seconds by algorithm (build and run): " + ", ".join(f"{a} {s:.0f}" for a, s in secs), file=sys.stderr)
    if res.get("layers_per_minute"):
        print(f"{res['elapsed_s']:.0f} s, {res['layers_per_minute']:.1f} layers/minute", file=sys.stderr)
    if res.get("interrupted"):
        print(f"interrupted: the counts below are those of the {res['layers']} layers finished", file=sys.stderr)
    print(res["summary"], flush=True)
