"""Markdown tables from `tvm-sparseconv layer --json` outputs (the README's benchmark tables).

usage: python examples/layer_table.py [--compact | --wide] [--peak GFLOPS] FILE.json...
Full (default): one table per layer and density, a row per algorithm.
Compact: one row per layer and density with the best algorithm, the best peer and the ratio
best peer / best algorithm (encode included). Wide: one row per layer and density, a column
per algorithm (total ms). "eff. GFLOP/s" counts only multiplies with a non-zero input, over the
total time and over the multiply stage alone (with its share of --peak, the CPU's FMA peak on
the threads used: measure it with examples/fma_peak.c). The first line names the CPU the
files were measured on. A dense peer's
time does not depend on the density, so the peer time used for a layer is the fastest peer
measurement over all its densities (the ratios are conservative: one slow peer run does not
flatter them).
"""
import json
import sys

PEERS = ("onnxruntime", "pytorch")


def shape(r):
    l = r["layer"]
    s = f"{l['in_channels']}->{l['out_channels']} {l['kernel_h']}x{l['kernel_w']} at {l['height']}x{l['width']}"
    return s + (f" stride {l['stride'][0]}" if l["stride"][0] > 1 else "")


def timed(rep):
    return [r for r in rep["results"] if r.get("time_ms")]


def best_peers(reps) -> dict:
    """layer shape -> the fastest peer record over every density of that layer."""
    best = {}
    for rep in reps:
        for r in timed(rep):
            if r["algorithm"] in PEERS and (shape(rep) not in best or r["time_ms"] < best[shape(rep)]["time_ms"]):
                best[shape(rep)] = r
    return best


def main(argv):
    mode = next((a for a in argv if a in ("--compact", "--wide")), "--full")
    peak = float(argv[argv.index("--peak") + 1]) if "--peak" in argv else None
    files = [f for i, f in enumerate(argv) if not f.startswith("--") and (i == 0 or argv[i - 1] != "--peak")]
    reps = [json.load(open(f)) for f in files]
    cpus = {json.dumps(r.get("cpu"), sort_keys=True) for r in reps}
    for c in map(json.loads, cpus):
        print(f"CPU: {c['name']} ({c['isa']}, {c['lanes']} float32 lanes), {reps[0]['threads'] or c['cores']} threads"
              if c else "CPU: not recorded in these files")
    print()
    peers = best_peers(reps)
    algos = list(dict.fromkeys(r["algorithm"] for rep in reps for r in timed(rep) if r["algorithm"] not in PEERS))
    if mode == "--compact":
        print("| layer | density | best algorithm | ms (encode) | best peer ms | speed-up | eff. GFLOP/s | "
              "eff. GFLOP/s, multiply alone |")
        print("|---|---|---|---|---|---|---|---|")
    elif mode == "--wide":
        print("| layer | density | " + " | ".join(algos + list(PEERS)) + " | best / best peer |")
        print("|---|---|" + "---|" * (len(algos) + len(PEERS) + 1))
    for rep in reps:
        ok = timed(rep)
        ours = [r for r in ok if r["algorithm"] not in PEERS]
        bp = peers.get(shape(rep))
        bo = min(ours, key=lambda r: r["time_ms"])
        if mode == "--compact":
            mult = bo["effective_gflops"] * bo["time_ms"] / bo["multiply_ms"]
            print(f"| {shape(rep)} | {rep['density']:.2f} | {bo['algorithm']} | {bo['time_ms']:.2f} "
                  f"({bo['encode_ms']:.2f}) | {bp['time_ms']:.2f} ({bp['algorithm']}) | "
                  f"{bp['time_ms'] / bo['time_ms']:.2f}x | {bo['effective_gflops']:.0f} | {mult:.0f}"
                  + (f" ({100 * mult / peak:.0f} %)" if peak else "") + " |")
            continue
        if mode == "--wide":
            t = {r["algorithm"]: r["time_ms"] for r in ok}
            cells = [("**%.2f**" if a == bo["algorithm"] else "%.2f") % t[a] if a in t else "-"
                     for a in algos + list(PEERS)]
            print(f"| {shape(rep)} | {rep['density']:.2f} | " + " | ".join(cells) +
                  f" | {bo['algorithm']} {bp['time_ms'] / bo['time_ms']:.2f}x |")
            continue
        print(f"\n**{shape(rep)}, density {rep['density']:.2f}** (MetaSchedule trials per dense algorithm: "
              f"see the script)\n")
        print("| algorithm | total ms | encode ms | multiply ms | eff. GFLOP/s | dense-eq. GFLOP/s | stored MB | "
              "CR vs im2col | CR vs MEC | vs best peer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in ok:
            f = lambda k, nd=2: "-" if r.get(k) is None else f"{r[k]:.{nd}f}"
            mb = "-" if not r.get("stored_bytes") else f"{r['stored_bytes'] / 1e6:.1f}"
            vs = f"{bp['time_ms'] / r['time_ms']:.2f}x" if bp else "-"
            print(f"| {r['algorithm']} | {f('time_ms')} | {f('encode_ms')} | {f('multiply_ms')} | "
                  f"{f('effective_gflops', 0)} | {f('dense_gflops', 0)} | {mb} | {f('cr_vs_im2col')} | "
                  f"{f('cr_vs_mec')} | {vs} |")


if __name__ == "__main__":
    main(sys.argv[1:])
