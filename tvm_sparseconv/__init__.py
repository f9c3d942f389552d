"""tvm-sparseconv: sparse-activation convolution algorithms as compiled Apache TVM kernels.

Importing the package sets TVM_NUM_THREADS to all cores when it is unset: TVM's own default
on x86 is half the vCPUs (1 thread on a 2-vCPU machine).
"""
import os as _os

_os.environ.setdefault("TVM_NUM_THREADS", str(_os.cpu_count() or 1))

from .conv import Conv2DSpec, ConvSpecError, Epilogue, UnsupportedConvError  # noqa: E402
from .algorithms import ALGORITHMS, SPARSE, get_algorithm  # noqa: E402
from .build import CompiledLayer  # noqa: E402
from .frontend import Model, ModelError, load_model  # noqa: E402
from .plan import Plan, PlanError  # noqa: E402
from .compile import lower  # noqa: E402
from .api import compile, pipeline  # noqa: E402
from .tune.predict import predict_plan  # noqa: E402
from .target import export_library  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Conv2DSpec", "ConvSpecError", "Epilogue", "UnsupportedConvError", "ALGORITHMS", "SPARSE",
           "get_algorithm", "CompiledLayer", "Model", "ModelError", "load_model", "Plan", "PlanError",
           "compile", "lower", "pipeline", "export_library", "predict_plan"]

