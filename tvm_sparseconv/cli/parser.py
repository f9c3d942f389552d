"""The ``tvm-sparseconv`` arguments: one argparse subparser per command, nothing else.

main (``__init__.py``) runs ``commands.COMMANDS[args.command]`` on what this parses.
"""
from __future__ import annotations

import argparse

from ..build import CACHE_MODES
from ..tune.space import EXPLORE, KNOB_TRIALS, TOP_K

# the top-level --help's description (the text of cli.py's docstring before cli became a package)
DESCRIPTION = "The ``tvm-sparseconv`` command."
ALGORITHM_HELP = ("one algorithm on every layer that supports it (a hand-scheduled dense one elsewhere), with the "
                  "knobs and layouts the cost model predicts for the target")


def ints(s: str, n: int | None = None) -> tuple[int, ...]:
    """"1,64,56,56" or "3x3" -> (ints); one value repeated ``n`` times when ``n`` is given."""
    v = tuple(int(a) for a in str(s).replace("x", ",").split(",") if a != "")
    if n is not None and len(v) == 1:
        v = v * n
    return v


def _known():
    from ..models import KNOWN_MODELS

    return list(KNOWN_MODELS)


def _model_args(p, inputs: bool = True) -> None:
    p.add_argument("model", help="an .onnx file or a known model: " + ", ".join(_known()))
    p.add_argument("--input-shape", default=None, help="fix the model input shape, e.g. 1,224,224,3")
    if inputs:
        _input_args(p)
    p.add_argument("--target", default=None, help="JSON dict target (default: this CPU)")
    p.add_argument("--threads", type=int, default=0, help="TVM threads (default: all cores)")


def _input_args(p) -> None:
    g = p.add_argument_group("sample inputs and preprocessing")
    g.add_argument("--images", nargs="+", default=[], help="image files, or skimage:NAME / sklearn:NAME samples")
    g.add_argument("--inputs", nargs="+", default=[], help="preprocessed model inputs (.npy)")
    g.add_argument("--scale", type=float, default=None, help="pixel multiplier (default 1/255)")
    g.add_argument("--mean", default=None, help="per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", default=None, help="per-channel std divided by")
    g.add_argument("--bgr", action="store_true", default=None, help="feed channels as BGR")


def _cost_model_arg(p) -> None:
    p.add_argument("--cost-model", default=None, metavar="FILE", help="with no plan given or shipped for this "
                   "model and target, the plan is predicted by this cost model (default: the shipped one; "
                   "docs/cost-model.md); --images are profiled for the densities, else defaults are used")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvm-sparseconv", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layer", help="run one conv layer through every algorithm (and the peers)")
    src = lay.add_argument_group("the layer: from files, or synthesised")
    src.add_argument("--input", help="activation .npy, N x C x H x W (or C x H x W)")
    src.add_argument("--weight", help="weight .npy, M x C x Kh x Kw")
    src.add_argument("--shape", default="1,64,56,56", help="N,C,H,W to synthesise (default %(default)s)")
    src.add_argument("--out-channels", "-m", type=int, default=64)
    src.add_argument("--kernel", "-k", default="3", help="Kh,Kw or one size (default %(default)s)")
    src.add_argument("--density", type=float, default=0.3, help="share of non-zeros (default %(default)s)")
    src.add_argument("--seed", type=int, default=0)
    lay.add_argument("--stride", default="1")
    lay.add_argument("--padding", default="1", help="p | ph,pw | top,left,bottom,right")
    lay.add_argument("--dilation", default="1")
    lay.add_argument("--groups", type=int, default=1)
    lay.add_argument("--algorithms", default="all", help="comma list or 'all'")
    lay.add_argument("--target", default=None, help='JSON dict, e.g. \'{"kind":"llvm","mcpu":"znver4","num-cores":2}\'')
    lay.add_argument("--threads", type=int, default=0, help="TVM / peer threads (default: all cores)")
    lay.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per dense algorithm (0 = untuned)")
    lay.add_argument("--work-dir", default=None, help="where --trials puts the MetaSchedule databases "
                     "(one folder per algorithm)")
    lay.add_argument("--database", default=None, help="a --work-dir of an earlier run: apply its tuned schedules")
    lay.add_argument("--knob-trials", type=int, default=1, help="knob configs measured per hand-scheduled "
                     "kernel, the defaults first (as the tuner's search); the fastest is reported")
    lay.add_argument("--repeat", type=int, default=7, help="timed repeats (median reported)")
    lay.add_argument("--peers", action="store_true", help="also run onnxruntime and PyTorch")
    lay.add_argument("--json", action="store_true", help="print one JSON object")
    lay.add_argument("--quiet", "-q", action="store_true")

    pro = sub.add_parser("profile", help="measure each conv layer's input density on sample inputs")
    _model_args(pro)
    pro.add_argument("--algorithm", default="dense", help="how the convs run while profiling")
    pro.add_argument("--json", action="store_true")

    com = sub.add_parser("compile", help="rewrite the convs per plan, compile and export a library")
    _model_args(com)
    com.add_argument("--plan", default=None, help="plan JSON (from tune, or written by hand); default: the plan "
                     "shipped in tvm_sparseconv/shipped/ for this model and target, else a predicted one")
    com.add_argument("--algorithm", default=None, help=ALGORITHM_HELP)
    com.add_argument("--database", default=None, help="MetaSchedule JSON database folder for the dense ops")
    _cost_model_arg(com)
    com.add_argument("-o", "--output", required=True, help="the .so to write (plus a .json beside it)")
    com.add_argument("--cross-compiler", default=None, metavar="CC", help="for a target of another architecture "
                     "(an aarch64 mtriple): the compiler that links the library (default: $TVMS_CROSS_CC, else "
                     "MTRIPLE-gcc, e.g. aarch64-linux-gnu-gcc)")

    ben = sub.add_parser("bench", help="end-to-end latency: plan vs all-dense vs onnxruntime vs PyTorch")
    _model_args(ben)
    ben.add_argument("--plan", default=None, help="plan JSON; default: the shipped plan, else a predicted one")
    ben.add_argument("--algorithm", default=None, help=ALGORITHM_HELP)
    ben.add_argument("--database", default=None)
    _cost_model_arg(ben)
    ben.add_argument("--baseline", default="dense", help="the algorithm of the all-dense build (default dense; "
                     "its knobs as --algorithm's), or another plan's .json to compare with")
    ben.add_argument("--batch", type=int, default=None, help="images per inference: the model imported at this "
                     "batch, the sample images repeated to fill it, the plan (tuned at any batch) applied as it is")
    ben.add_argument("--rounds", type=int, default=1, help="time every build and peer this many times in turn "
                     "(medians and per-round ratios: the machine's drift hits all alike)")
    ben.add_argument("--repeat", type=int, default=10)
    ben.add_argument("--no-peers", action="store_true")
    ben.add_argument("--ops", action="store_true", help="also where the plan's time goes: ms per kind of op")
    ben.add_argument("--json", action="store_true")

    mem = sub.add_parser("memory", help="memory per conv layer (worst-case workspace buffers, constants), Relax's "
                         "storage plan, and the peak RSS of the exported library against onnxruntime's")
    _model_args(mem)
    mem.add_argument("--plan", default=None, help="plan JSON (default: the plan shipped for this model and target)")
    mem.add_argument("--algorithm", default=None, help=ALGORITHM_HELP)
    mem.add_argument("--database", default=None, help="MetaSchedule JSON database folder for the dense ops")
    _cost_model_arg(mem)
    mem.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes, each built, exported and "
                     "run in a fresh process (default: 1 8)")
    mem.add_argument("--baseline", default="dense", help="the algorithm of the all-dense build (default dense; "
                     "its knobs as --algorithm's)")
    mem.add_argument("--no-peers", action="store_true", help="leave out onnxruntime")
    mem.add_argument("--repeat", type=int, default=3, help="fresh processes per build and batch; the median peak "
                     "is reported (default %(default)s)")
    mem.add_argument("--formats", action="store_true", help="also what each algorithm's format stores on the "
                     "sample images' activations, per layer, against im2col and MEC")
    mem.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    mem.add_argument("--markdown", default=None, metavar="OUT", help="also write the tables as markdown")

    ref = sub.add_parser("refine", help="choose each dense layer's thread split inside the compiled model "
                         "(layers timed alone cannot see where their input sits); write a plan")
    _model_args(ref)
    ref.add_argument("--plan", default=None, help="plan JSON (default: the shipped plan for this model, else a "
                     "predicted one); a given or shipped plan is also timed against the predicted plan")
    _cost_model_arg(ref)
    ref.add_argument("--rounds", type=int, default=7, help="interleaved end-to-end rounds (default %(default)s)")
    ref.add_argument("-o", "--output", required=True, help="the refined plan's .json")

    tun = sub.add_parser("tune", help="measure every algorithm per conv layer on real activations; write a plan")
    _model_args(tun)
    tun.add_argument("--trials", type=int, default=0, help="MetaSchedule trials in all for the dense TE ops "
                     "(direct, im2col, MEC); 0 leaves them out")
    tun.add_argument("--knob-trials", type=int, default=KNOB_TRIALS, help="each hand-scheduled kernel's pool is its first "
                     "4x this many configs; --exhaustive measures this many of each per layer (default %(default)s)")
    tun.add_argument("--exhaustive", action="store_true", help="measure --knob-trials configs of every algorithm "
                     "per layer, instead of the cost model's most promising candidates")
    tun.add_argument("--top-k", type=int, default=TOP_K, help="candidates per layer with the lowest predicted time "
                     "that are measured (default %(default)s)")
    tun.add_argument("--explore", type=int, default=EXPLORE, help="other candidates per layer measured, drawn at random "
                     "(default %(default)s)")
    tun.add_argument("--cost-model", default=None, metavar="FILE", help="the prior of the search (default: the "
                     "shipped cost model; missing or corrupt: the exhaustive search)")
    tun.add_argument("--budget-minutes", type=float, default=None, help="stop measuring new candidates after this")
    tun.add_argument("--cache", choices=CACHE_MODES, default="fresh",
                     help="what the caches hold when a candidate runs: fresh (default: its input just "
                     "rewritten by a copy split over the threads, as the op before leaves it in a model; "
                     "weights warm), warm (everything warm, the layer alone) or cold (all but the first "
                     "argument flushed); over RPC fresh falls back to cold")
    tun.add_argument("--no-layouts", action="store_true", help="keep every layer's activations in NCHW: skip the "
                     "phase that times in channel blocks the layers that take them (dense, and grouped on "
                     "depthwise layers) and the transforms between layouts, and chooses each layer's "
                     "layouts for the whole model")
    tun.add_argument("--no-refine", action="store_true", help="skip the last phase, which compiles the model "
                     "with each thread split of the dense layers and keeps the fastest end to end (`refine`)")
    tun.add_argument("--refine-rounds", type=int, default=7,
                     help="refine's interleaved end-to-end rounds (default %(default)s)")
    tun.add_argument("--recheck-rounds", type=int, default=5, help="the close candidates of each layer (within "
                     "25 %% of its fastest), and its fastest per layout pair, re-timed in this many interleaved "
                     "rounds before each choice, which takes their medians (default %(default)s; 0: each "
                     "candidate's single time)")
    tun.add_argument("--algorithms", default="all")
    tun.add_argument("--out", default="tuning_logs", help="parent folder of the run folder (default %(default)s)")
    tun.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted or killed run: "
                     "it repeats no finished profile, measurement, MetaSchedule trial or refine build")
    tun.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on RPC servers")
    tun.add_argument("--rpc-key", default=None)

    cm = sub.add_parser("cost-model", help="the cost model of the kernels: retrain it from tuning logs, evaluate "
                        "it leaving one CPU out, show what it was trained on (docs/cost-model.md)")
    cms = cm.add_subparsers(dest="action", required=True)
    trn = cms.add_parser("train", help="train a cost model on tuning runs (deterministic: the shipped runs give "
                         "the shipped model)")
    trn.add_argument("runs", nargs="*", metavar="RUN", help="tuning run folders (trials.jsonl and profile.json), "
                     "default: the shipped ones")
    trn.add_argument("-o", "--output", required=True, help="the model file to write (.json, or .json.gz)")
    eva = cms.add_parser("evaluate", help="leave one CPU out: offline scores on each held-out CPU's logs; with "
                         "--end-to-end, the predicted, tuned and rule plans timed on this machine")
    eva.add_argument("runs", nargs="*", metavar="RUN", help="tuning run folders, default: the shipped ones")
    eva.add_argument("--end-to-end", action="store_true", help="also compile and time the three plans of each "
                     "--models on this CPU, the model trained without this CPU's logs")
    eva.add_argument("--models", nargs="+", default=["vgg16-tumor", "resnet50-nsfw"], help="known models or .onnx "
                     "files to time (default: %(default)s)")
    eva.add_argument("--images", nargs="+", default=[], help="sample images profiled for the densities (default: "
                     "the first two sample photos); the first is timed")
    eva.add_argument("--inputs", nargs="+", default=[], help="or preprocessed model inputs (.npy)")
    eva.add_argument("--tuned", nargs="+", default=[], metavar="MODEL=PLAN", help="the tuned plan of a model on "
                     "this CPU (default: the shipped one)")
    eva.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    eva.add_argument("--repeat", type=int, default=10)
    eva.add_argument("--target", default=None, help="JSON dict target (default: this CPU)")
    eva.add_argument("--threads", type=int, default=0)
    eva.add_argument("--json", action="store_true")
    sho = cms.add_parser("show", help="what a cost model was trained on")
    sho.add_argument("file", nargs="?", default=None, help="a model file (default: the shipped one)")

    rep = sub.add_parser("report", help="regenerate a tuning run's report.md and plots")
    rep.add_argument("run_dir")

    run = sub.add_parser("run", help="run an exported model on images: top-5 and median latency")
    run.add_argument("library", help="model.so written by compile")
    _input_args(run)
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--repeat", type=int, default=10)

    alg = sub.add_parser("algorithms", help="list the convolution algorithms and their properties (the registry)")
    alg.add_argument("--markdown", action="store_true", help="print a GitHub markdown table (the README's and "
                     "docs' table of algorithms is this output)")

    fuz = sub.add_parser("fuzz", help="random small conv layers through every algorithm, each output checked "
                         "against the float64 reference (docs/fuzz.md); exit code 1 on any wrong answer or error")
    fuz.add_argument("--layers", type=int, default=100, help="layers 0..N-1 of the campaign (default %(default)s)")
    fuz.add_argument("--seed", type=int, default=0, help="the campaign's seed: layer k's own seed follows from "
                     "it and k (default %(default)s)")
    fuz.add_argument("--only", default=None, metavar="K[,K...]", help="run only these layers of the campaign "
                     "(what a failing case's rerun line says)")
    fuz.add_argument("--algorithms", default="all", help="comma list or 'all'")
    fuz.add_argument("--knob-dicts", type=int, default=1, help="knob dicts per algorithm and layer, drawn from its "
                     "knob space, the defaults in half the draws (default %(default)s)")
    fuz.add_argument("--bounds-check", action=argparse.BooleanOptionalAction, default=True,
                     help="put guard zones around every buffer and run each candidate twice: an access outside a "
                     "buffer is an error (default: on)")
    fuz.add_argument("--json", metavar="OUT", default=None, help="write the counts and every failing case "
                     "(layer, seeds, algorithm, knobs, max error or error text, rerun command) here, "
                     "replaced whole after each layer")
    fuz.add_argument("--resume", metavar="JSON", default=None, help="go on with the campaign a --json file "
                     "records (same seed, algorithms, knob dicts, bounds check and target): its layers are not "
                     "run again, and the file is updated unless --json names another")
    fuz.add_argument("--jobs", type=int, default=1, help="layers built at once, one worker process each "
                     "(default %(default)s)")
    fuz.add_argument("--timeout", type=float, default=300, help="seconds a candidate's build and run may take "
                     "before it counts as an error (default %(default)s)")
    fuz.add_argument("--target", default=None, help="JSON dict target (default: this CPU)")
    fuz.add_argument("--threads", type=int, default=0, help="TVM threads per worker (default: all cores)")

    res = sub.add_parser("results", help="render saved `bench --json`, `layer --json` and `memory --json` results "
                         "as markdown tables, one set per CPU")
    res.add_argument("files", nargs="+", metavar="FILE.json", help="what bench --json or layer --json printed, "
                     "or memory --json wrote")
    res.add_argument("-o", "--output", default=None, metavar="OUT.md", help="write the markdown here, under a "
                     "line naming the command and files it came from (default: print it)")
    return p
