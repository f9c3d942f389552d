"""The Python API on a real model: profile, plan, compile, export, load in the runtime, run."""
import numpy as np
import tvm
from tvm import relax

import tvm_sparseconv as tvms
from tvm_sparseconv.images import load_inputs
from tvm_sparseconv.models import known_preprocess, model_path
from tvm_sparseconv.profile import profile


def main():
    model = tvms.load_model(model_path("resnet50-nsfw"))
    x = load_inputs(model, ["skimage:astronaut"], preprocess=known_preprocess("resnet50-nsfw"))[0]

    layers, _, _ = profile(model, [x])
    for l in layers[:5]:
        print(f"{l.key}: density {l.density_mean:.2f}")

    # a hand-written plan: halo where the input is at most 60% dense, the dense kernel elsewhere
    plan = tvms.Plan.uniform(model.sites, "dense")
    for pl, prof in zip(plan.layers, layers):
        if prof.density_mean <= 0.6:
            pl.algorithm = "halo"
    ex = tvms.compile(model, plan=plan)
    ex.export_library("resnet50_nsfw.so")

    vm = relax.VirtualMachine(tvm.runtime.load_module("resnet50_nsfw.so"), tvm.cpu())
    print("sfw/nsfw:", vm["main"](tvm.runtime.tensor(x)).numpy())


# the guard: profile and compile build in a worker process, which imports this script again
if __name__ == "__main__":
    main()
