"""The child process of memory.peak_rss: one model run, alone, and the process's memory.

memory.py runs this file's source with ``python -c`` in an empty folder, never as a module of
the package: the child must import nothing of tvm_sparseconv (the exported library runs with
the TVM runtime alone), nor have the package's folder on sys.path. Arguments:

    RUNNER MODEL X OUT THREADS RUNS

RUNNER ``tvm`` imports numpy and tvm, loads the exported library MODEL and runs its ``main`` in
a VirtualMachine; ``tvm-runtime`` does the same in TVM's runtime-only mode (the parent sets
TVM_USE_RUNTIME_LIB=1: ``import tvm`` loads libtvm_runtime without the compiler library, as a
machine that only runs models needs); ``onnxruntime`` imports numpy and onnxruntime and runs
the .onnx MODEL (default session options, THREADS intra-op threads, 0 = onnxruntime's default).
X is the input (.npy), RUNS how many inferences.

PyTorch is hidden (``sys.modules["torch"] = None``: importing it fails as if it were not
installed). tvm_ffi imports it whenever it can, about 200 MB resident, although neither runtime
uses it: a machine that only runs the model does not need it.

OUT.json gets memory in kB as Linux counts it (/proc/self/status): VmRSS after the imports
(``import_rss``); VmRSS and VmHWM once the model is loaded (``load_rss``, ``load_hwm``: the peak
so far, loading included); then VmHWM is reset to the current RSS (/proc/self/clear_refs) and
read again after the runs (``run_hwm``: the peak while running). getrusage's ru_maxrss is read
at both points (``load_maxrss``, ``run_maxrss``), a second reading of the same peaks (Linux
carries ru_maxrss over from the parent of an exec: memory.peak_rss starts this child through a
shell so that it starts small). ``modules``: which of tvm, onnxruntime, torch and
tvm_sparseconv the process imported; ``libraries``: which of TVM's runtime and compiler libraries
it mapped (/proc/self/maps). OUT.npy gets the last output.
"""
import json
import resource
import sys


def status() -> dict:
    """VmRSS and VmHWM of this process, kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset() -> dict:
    """status() and ru_maxrss now; then VmHWM (and with it ru_maxrss) reset to the current RSS."""
    now = {**status(), "maxrss": maxrss()}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return now


def main(runner: str, model: str, x_path: str, out: str, threads: int, runs: int) -> None:
    sys.modules["torch"] = None
    import numpy as np

    if runner in ("tvm", "tvm-runtime"):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax.VirtualMachine; tvm.relax needs the compiler

        imported = status()
        vm = VirtualMachine(tvm.runtime.load_module(model), tvm.cpu())
        x = tvm.runtime.tensor(np.load(x_path))
        loaded = reset()
        for _ in range(runs):
            y = vm["main"](x)
        y = (y if hasattr(y, "numpy") else y[0]).numpy()
    elif runner == "onnxruntime":
        import onnxruntime as ort

        imported = status()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.load(x_path)}
        loaded = reset()
        for _ in range(runs):
            y = sess.run(None, feed)[0]
    else:
        raise SystemExit(f"unknown runner {runner!r}")
    end = status()
    np.save(out + ".npy", y)
    seen = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None}
                  & {"tvm", "onnxruntime", "torch", "tvm_sparseconv"})
    with open("/proc/self/maps") as f:
        maps = f.read()
    libs = [lib for lib in ("libtvm_runtime", "libtvm_compiler") if lib in maps]
    kb = {"import_rss": imported["VmRSS"], "load_rss": loaded["VmRSS"], "load_hwm": loaded["VmHWM"],
          "load_maxrss": loaded["maxrss"], "run_hwm": end["VmHWM"], "run_maxrss": maxrss()}
    with open(out + ".json", "w") as f:
        json.dump({**kb, "modules": seen, "libraries": libs}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
