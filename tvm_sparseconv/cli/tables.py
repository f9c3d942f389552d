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

def print_compiled(output: str, counts: str, transforms=()) -> None:
    """compile: the library written, Build.counts() of what it computes and the layout
    transforms it makes (Build.transforms: (from var, to var, "src->dst"))."""
    print(f"wrote {output} (+ {os.path.basename(output)}.json); layers: {counts}")
    if transforms:
        print(f"layout transforms: {len(transforms)} (" + ", ".join(f"{t} to {v}" for _, v, t in transforms) + ")")


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
    if res.get("speedup_vs_peers") is not None:
        print(f"plan vs the best peer: {res['speedup_vs_peers']:.2f}x")
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
        e2e = "   (left out of the rounds)" if b["ms"] is None else f"{b['ms']:8.2f} ms"
        print(f"  {b['name']:16} {e2e}  in the model: conv calls {sum(b['layer_ms'].values()):7.2f} ms, "
              f"all calls {b['calls_ms']:7.2f} ms" + ("  <- chosen" if b["name"] == report["chosen"] else ""))
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


def _layer_counts(plan) -> str:
    """'algorithm count, ...' of a plan's layers, and how many keep channel blocks."""
    counts = {}
    for l in plan.layers:
        counts[l.algorithm] = counts.get(l.algorithm, 0) + 1
    blocked = sum(1 for l in plan.layers if "nchw_knobs" in l.note)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + (f", {blocked} in channel blocks" if blocked else "")


def forced_line(asked: str, plan) -> str:
    """The one line a command says of the plan of ``asked`` ("--algorithm A", "--baseline A";
    tune/predict.py)."""
    how = plan.model.get("plan", "")
    what = "knobs and layouts predicted by the cost model" if how.endswith("predicted knobs") else \
        f"default knobs ({plan.model.get('why')})"
    return f"{asked}: {_layer_counts(plan)}; {what}"


def predicted_line(model: str, key: str, plan) -> str:
    """The one line a command says when it takes a predicted plan (tune/predict.py): what it is
    and how to refine or tune it for more."""
    how = plan.model.get("plan")
    what = "predicted by the cost model" if how == "predicted" else \
        f"of the fixed rule ({plan.model.get('why') or 'no cost model'})"
    return (f"no plan shipped for {model} on {key}: using a plan {what} ({_layer_counts(plan)}; "
            f"densities: {plan.model.get('densities')}); for a faster one, check its splits and layouts "
            f"in the model (minutes): tvm-sparseconv refine {model} --images ... -o plan.json, or tune it: "
            f"tvm-sparseconv tune {model} --images ... (then --plan RUN/plan.json)")


def print_cost_model(path: str, trained_on: list[dict], features: int, rounds: int,
                     same: bool | None = None) -> None:
    """cost-model train/show: the file, and the runs the model was trained on."""
    print(f"cost model {path}: {features} features, {rounds} trees, trained on {len(trained_on)} runs "
          f"({sum(r.get('records', 0) for r in trained_on)} measured candidates)")
    for r in trained_on:
        print(f"  {r.get('run')}: {r.get('model')} on {r.get('cpu', {}).get('name')} "
              f"({r.get('cpu', {}).get('isa')}), {r.get('records')} candidates, sha256 {str(r.get('sha256'))[:12]}")
    if same is not None:
        print("the same predictions as the shipped model: "
              + ("yes" if same else "NO (another xgboost, or other logs)"))


def print_cost_model_evaluation(res: dict) -> None:
    """cost-model evaluate: the offline table, and the end-to-end one when it ran."""
    rows = [["held-out CPU", "layers", "top-1", "same algorithm", "recall@3", "recall@5", "regret", "rule regret"]]
    for r in res["offline"]:
        if not r.get("layers"):
            rows.append([r["cpu"], "0"] + ["-"] * 6)
            continue
        rows.append([r["cpu"], str(r["layers"]), f"{r['top1']:.2f}", f"{r['same_algo']:.2f}", f"{r['recall@3']:.2f}",
                     f"{r['recall@5']:.2f}", f"{100 * r['regret']:.1f} %", f"{100 * r['rule_regret']:.1f} %"])
    print("offline, leaving one CPU out (trained on the others' logs; per layer, among the candidates its log "
          "measured):")
    for line in _text_table(rows[0], rows[1:], set(range(1, 8))):
        print(line)
    if len(rows) == 1:
        print("(no CPU has another CPU's logs to be predicted from)")
    e2e = res.get("end_to_end")
    if not e2e:
        return
    print(f"\nend to end on {e2e['cpu_description']}, the model trained on: {', '.join(e2e['trained_on'])}")
    table = []
    for m in e2e["models"]:
        for r in m["rows"]:
            table.append([m["model"], r["name"], f"{r['ms']:.2f}", f"{r['vs_tuned']:.3f}" if r.get("vs_tuned") else "-",
                          fmt(r["max_abs_error"], 6), r["layers"]])
    for line in _text_table(["model", "plan", "median ms", "vs tuned", "max err vs predicted", "layers"], table,
                            {2, 3, 4}):
        print(line)


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
              + ["plan speed-up over the best other", "over the best peer"])
    rows = []
    for path, d in saved:
        ms = {r["name"]: r["ms"] for r in d["rows"]}
        rows.append([d.get("model") or path, _shape(d.get("input_shape")), fmt(d.get("threads")),
                     fmt(d.get("rounds"))] + [_ms(ms.get(n)) for n in names] + [f"{d['speedup_vs_best']:.2f}x"]
                    + [f"{d['speedup_vs_peers']:.2f}x" if d.get("speedup_vs_peers") is not None else "-"])
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
    """Saved results, (path, "bench", "layer" or "memory", dict) each, as markdown: a section per
    CPU (the ``cpu`` dict each recorded; "CPU not recorded" for files without it), its ``bench``
    table, its ``layer`` table, then a section per ``memory`` result, in the order of the files."""
    groups: dict[str, dict[str, list]] = {}
    for path, kind, d in saved:
        cpu = cpu_line(d["cpu"]) if d.get("cpu") else "CPU not recorded"
        groups.setdefault(cpu, {"bench": [], "layer": [], "memory": []})[kind].append((path, d))
    out = []
    for cpu, by_kind in groups.items():
        out += [f"## {cpu}", ""]
        if by_kind["bench"]:
            out += _bench_section(by_kind["bench"])
        if by_kind["layer"]:
            out += _layer_section(by_kind["layer"])
        if by_kind["memory"]:
            out += ["### Memory (`memory`)", "", MEMORY_LEGEND, ""]
        for _, d in by_kind["memory"]:
            out += [memory_markdown(d, level=4, legend=False)]
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
# -- memory -----------------------------------------------------------------------------------

def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.2f}"


def _chw(spec: dict) -> str:
    return f"{spec['in_channels']}x{spec['height']}x{spec['width']}"


def _memory_tables(res: dict) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """memory.measure_model's result (with the memory command's fields) as tables: (title,
    header, rows, right-aligned columns). The text and the markdown printers lay these out."""
    out = []
    rows = []
    for e in res["batches"]:
        for b in e["builds"]:
            sp = b.get("storage_plan") or {}
            rows.append([str(e["batch"]), b["name"], b["layers"] or "-"]
                        + [f"{b[k]:.1f}" for k in ("import_mb", "load_mb", "load_peak_mb", "run_peak_mb", "peak_mb",
                                                   "peak_over_import_mb")]
                        + [_mb(sp.get("planned_bytes")), _mb(sp.get("tensor_bytes")), fmt(b["max_abs_error"], 6)])
    out.append((f"Resident memory of a fresh process running the model, MB (VmRSS / VmHWM; the median of "
                f"{res.get('repeat', 1)} processes by peak)",
                ["batch", "build", "layers", "imported", "loaded", "load peak", "run peak", "peak",
                 "peak - imported", "Relax storage plan", "tensors unshared", "max err"], rows,
                {0, *range(3, 12)}))
    first = res["batches"][0]
    rows = []
    for l in first["layers"]:
        act = l["activation_bytes"]
        rows.append([l["key"], l["algorithm"], _chw(l["spec"]), _mb(act), _mb(l["workspace_bytes"]),
                     f"{l['workspace_bytes'] / act:.2f}", _mb(l["constant_bytes"]), _mb(l["total_bytes"]),
                     ", ".join(f"{b['name']} {b['bytes'] / 1e6:.2f}" for b in l["buffers"]) or (l["note"] or "-")])
    t = first["totals"]
    rows.append(["total", "", "", _mb(t["activation_bytes"]), _mb(t["workspace_bytes"]),
                 fmt(t["workspace_over_activation"]), _mb(t["constant_bytes"]),
                 _mb(t["workspace_bytes"] + t["constant_bytes"]), ""])
    out.append((f"Conv layers at batch {first['batch']}: workspace buffers sized for the worst case, constants (MB)",
                ["layer", "algorithm", "input CxHxW", "input", "workspace", "x input", "constants", "total",
                 "workspace buffers"], rows, {3, 4, 5, 6, 7}))
    if res.get("formats"):
        out += _format_tables(res["formats"])
    return out


def _format_tables(formats: dict) -> list:
    """memory.format_storage's rows as three tables (stored elements, stored bytes on the samples'
    activations; worst-case buffer bytes), a column per algorithm, the model's sums last; then
    the model's compression ratios against im2col and MEC."""
    layers = formats["layers"]
    names = list(layers[0]["algorithms"]) if layers else []
    tables = []
    for title, key, unit, show in (
            ("stored elements (thousands) on the samples' activations", "elements", 1e3, lambda v: f"{v / 1e3:.1f}"),
            ("stored MB on the samples' activations", "bytes", 1e6, _mb),
            ("MB of the buffers allocated (worst case: every element non-zero)", "worst_case_bytes", 1e6, _mb)):
        rows, total = [], dict.fromkeys(names, 0)
        for l in layers:
            row = [l["key"], _chw(l["spec"]), f"{l['spec']['kernel_h']}x{l['spec']['kernel_w']}",
                   f"{l['density']:.3f}"]
            for n in names:
                a = l["algorithms"][n]
                if "error" in a or total[n] is None:
                    total[n] = None
                if "error" in a:
                    row.append("n/a")
                else:
                    row.append(show(a[key]))
                    total[n] = None if total[n] is None else total[n] + a[key]
            rows.append(row)
        rows.append(["total", "", "", ""] + [show(total[n]) if total[n] is not None else "n/a" for n in names])
        tables.append((f"Formats, {title}", ["layer", "input CxHxW", "kernel", "density"] + names, rows,
                       set(range(3, 4 + len(names)))))
    ok = [n for n in names if all("error" not in l["algorithms"][n] for l in layers)]
    rows = []
    for n in ok:
        el = sum(l["algorithms"][n]["elements"] for l in layers)
        by = sum(l["algorithms"][n]["bytes"] for l in layers)
        worst = sum(l["algorithms"][n]["worst_case_bytes"] for l in layers)
        base = {b: (sum(l["algorithms"][b]["elements"] for l in layers), sum(l["algorithms"][b]["bytes"] for l in layers))
                for b in ("im2col", "mec") if b in ok}
        cr = [f"{base[b][i] / v:.2f}" if b in base and v else "-" for b in ("im2col", "mec") for i, v in ((0, el), (1, by))]
        rows.append([n, f"{el / 1e3:.1f}", _mb(by), _mb(worst), f"{worst / by:.2f}" if by else "-"] + cr)
    tables.append(("Formats, the model's sums: compression ratio (CR) against im2col and MEC (higher: smaller), "
                   "worst case against what the samples needed",
                   ["algorithm", "stored k elements", "stored MB", "worst-case MB", "worst / stored",
                    "CR im2col (elements)", "CR im2col (bytes)", "CR MEC (elements)", "CR MEC (bytes)"], rows,
                   set(range(1, 9))))
    return tables


def _memory_findings(res: dict) -> list[str]:
    """The sentences that read the numbers, per batch: what the worst-case sizing costs, what
    Relax's storage plan makes of it, what sets the plan's peak and how it compares with the
    all-dense build's (the peak without any workspace) and onnxruntime's."""
    out = []
    for e in res["batches"]:
        t = e["totals"]
        builds = {b["name"]: b for b in e["builds"]}
        plan, other = builds["plan"], builds.get(f"all {res['baseline']}")
        alone = next((b for b in e["builds"] if b.get("runner") == "tvm-runtime"), None)
        ort = builds.get("onnxruntime")
        sp = plan["storage_plan"]
        line = (f"Batch {e['batch']}: the conv layers' workspaces add up to {_mb(t['workspace_bytes'])} MB "
                f"({fmt(t['workspace_over_activation'])}x the layers' inputs, {_mb(t['activation_bytes'])} MB; the "
                f"largest {_mb(t['largest_workspace_bytes'])} MB, {t['largest_workspace_layer'] or '-'}). Relax's "
                f"storage plan holds all {_mb(sp['tensor_bytes'])} MB of the plan's intermediate tensors (workspaces "
                f"and activations) in {sp['storages']} blocks of {_mb(sp['planned_bytes'])} MB in all")
        if other:
            line += f" (the all-{res['baseline']} build: {_mb(other['storage_plan']['planned_bytes'])} MB)"
        phase = "loading the library" if plan["load_peak_mb"] >= plan["run_peak_mb"] else "running it"
        line += (f". Peak RSS: plan {plan['peak_mb']:.1f} MB, set by {phase} (load peak {plan['load_peak_mb']:.1f}, "
                 f"run peak {plan['run_peak_mb']:.1f})")
        if other:
            d = plan["peak_mb"] - other["peak_mb"]
            line += (f"; all {res['baseline']} {other['peak_mb']:.1f} MB, so the plan's worst-case workspaces move "
                     f"the peak by {d:+.1f} MB")
        if alone:
            line += f"; the plan on TVM's runtime alone {alone['peak_mb']:.1f} MB"
        if ort:
            line += f"; onnxruntime {ort['peak_mb']:.1f} MB: the plan's peak is {_above(plan, ort)}"
            if alone:
                line += f" ({_above(alone, ort)} on the runtime alone)"
        out.append(line + ".")
    return out


def _above(b: dict, ref: dict) -> str:
    d = b["peak_mb"] - ref["peak_mb"]
    return f"{abs(d):.1f} MB {'above' if d > 0 else 'below'} onnxruntime's"


MEMORY_LEGEND = (
    "How to read the memory tables. Every buffer a conv layer's stages write before its output is "
    "allocated for the worst case (every element of the activation non-zero), so a layer's workspace is "
    "fixed at compile time: the conv-layer table lists each buffer (MB) and the workspace as a multiple of "
    "the layer's input activation. Relax's StaticPlanBlockMemory (in tvm.compile's default pipeline) puts "
    "every intermediate tensor of the model, workspaces and activations, into storage blocks that tensors "
    "with disjoint lifetimes share, across layers: \"Relax storage plan\" is the sum of the blocks, "
    "\"tensors unshared\" what the tensors would take one by one. The resident-memory table runs the exported "
    "library in a fresh process that imports numpy and tvm only, and the ONNX file in one that imports "
    "onnxruntime only (default session options); PyTorch is hidden from both (tvm_ffi imports it whenever it is "
    "installed, about 190 MB, although neither runtime uses it); the row \"plan, TVM runtime only\" runs the "
    "plan's library again in TVM's runtime-only mode (TVM_USE_RUNTIME_LIB=1: import tvm loads the runtime "
    "library without the compiler's, as a machine that only runs models can). It reads VmRSS after the imports "
    "and after loading the model, and VmHWM (the peak) while loading and while running (reset in between); "
    "\"max err\" is against onnxruntime's output. The formats tables count what each algorithm's format stores "
    "on the activations of the sample photos (its NumPy encoder, its default knobs for this CPU, the mean over "
    "the photos) against the buffers it allocates; im2col's and MEC's lowered matrices are the baselines of "
    "the compression ratios. CPO and CPS count their column order, a constant, with the format.")


def _text_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    w = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
            for r in [header] + rows]


def _memory_head(res: dict) -> str:
    return (f"{res['model']}: input {tuple(res['input_shape'])} {res['layout']}, plan {res['plan']}, "
            f"{res['threads']} threads, samples: {', '.join(res['images'])}")


def print_memory(res: dict) -> None:
    """memory: its tables and findings as text."""
    print(_memory_head(res))
    print(f"cpu {cpu_line(res['cpu'])}")
    for title, header, rows, right in _memory_tables(res):
        print(f"\n{title}:")
        print("\n".join(_text_table(header, rows, right)))
    print()
    for line in _memory_findings(res):
        print(line)


def memory_markdown(res: dict, level: int = 2, legend: bool = True) -> str:
    """memory's result as a markdown section (its heading at ``level``): the findings, how to
    read the tables (MEMORY_LEGEND, unless ``legend`` is False), the tables, the command."""
    h = "#" * level
    out = [f"{h} {res['model']}", "", _memory_head(res) + ".", ""] + [l + "\n" for l in _memory_findings(res)]
    if legend:
        out += [MEMORY_LEGEND, ""]
    for title, header, rows, right in _memory_tables(res):
        out += [f"{h}# {title}", "", markdown_table(header, rows, right), ""]
    if res.get("command"):
        out += [f"Command: `{res['command']}`", ""]
    return "\n".join(out)
