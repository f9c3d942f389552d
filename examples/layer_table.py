"""Markdown tables from `tvm-sparseconv layer --json` outputs (the README's benchmark tables).

usage: python examples/layer_table.py [--compact] FILE.json...
Full: one row per algorithm and layer. Compact: one row per layer and density with the best
algorithm, the best peer and the ratio best peer / best algorithm (encode included).
"""
import json
import sys

PEERS = ("onnxruntime", "pytorch")


def shape(r):
    l = r["layer"]
    s = f"{l['in_channels']}->{l['out_channels']} {l['kernel_h']}x{l['kernel_w']} at {l['height']}x{l['width']}"
    return s + (f" stride {l['stride'][0]}" if l["stride"][0] > 1 else "")


def main(argv):
    compact = "--compact" in argv
    reps = [json.load(open(f)) for f in argv if not f.startswith("--")]
    if compact:
        print("| layer | density | best algorithm | ms (encode) | best peer ms | speed-up | eff. GFLOP/s |")
        print("|---|---|---|---|---|---|---|")
    for rep in reps:
        ok = [r for r in rep["results"] if r.get("time_ms")]
        peers = [r for r in ok if r["algorithm"] in PEERS]
        ours = [r for r in ok if r["algorithm"] not in PEERS]
        bp = min(peers, key=lambda r: r["time_ms"]) if peers else None
        bo = min(ours, key=lambda r: r["time_ms"])
        if compact:
            print(f"| {shape(rep)} | {rep['density']:.2f} | {bo['algorithm']} | {bo['time_ms']:.2f} "
                  f"({bo['encode_ms']:.2f}) | {bp['time_ms']:.2f} ({bp['algorithm']}) | "
                  f"{bp['time_ms'] / bo['time_ms']:.2f}x | {bo['effective_gflops']:.0f} |")
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
