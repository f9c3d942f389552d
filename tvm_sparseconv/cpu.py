"""The target CPU as the kernels see it: one description, read from the TVM target.

Specified in docs/algorithms.md section 13.

Every kernel default, knob space, tile check, encoder and thread split takes a :class:`CPU`
(``cpu_of(target)``) instead of a module constant, so that one code base builds the right
code for AVX-512 (16 float32 lanes, 32 registers, compress stores), AVX2 (8 lanes, 16
registers, masked stores but no compress) and NEON (4 lanes, 32 registers, neither).

The ISA comes from LLVM's feature list for the target's ``mtriple``/``mcpu``/``mattr``; the
cores from ``num-cores``. Cache sizes are read from the host (sysfs) when the target is this
machine's CPU; otherwise they come from CACHE_DEFAULTS, per CPU family (GENERIC_CACHES when
the family is unknown).
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import tvm

from .target import host_arch, host_cpu, make_target

KB, MB = 1 << 10, 1 << 20

# (L1d per core, L2 per core, L3 in all) for targets other than this machine, from the vendors'
# documentation; a family missing here gets GENERIC_CACHES
CACHE_DEFAULTS = {
    "haswell": (32 * KB, 256 * KB, 8 * MB), "broadwell": (32 * KB, 256 * KB, 8 * MB),
    "skylake": (32 * KB, 256 * KB, 8 * MB), "skylake-avx512": (32 * KB, 1 * MB, 32 * MB),
    "cascadelake": (32 * KB, 1 * MB, 32 * MB), "cooperlake": (32 * KB, 1 * MB, 32 * MB),
    "icelake-server": (48 * KB, 1280 * KB, 48 * MB), "rocketlake": (48 * KB, 512 * KB, 16 * MB),
    "sapphirerapids": (48 * KB, 2 * MB, 64 * MB), "emeraldrapids": (48 * KB, 2 * MB, 64 * MB),
    "graniterapids": (48 * KB, 2 * MB, 128 * MB),
    # client cores (the performance cores of hybrid parts) and the E-core-only families
    "cannonlake": (32 * KB, 256 * KB, 4 * MB), "icelake-client": (48 * KB, 512 * KB, 8 * MB),
    "tigerlake": (48 * KB, 1280 * KB, 12 * MB), "alderlake": (48 * KB, 1280 * KB, 30 * MB),
    "raptorlake": (48 * KB, 2 * MB, 36 * MB), "meteorlake": (48 * KB, 2 * MB, 24 * MB),
    "arrowlake": (48 * KB, 3 * MB, 36 * MB), "arrowlake-s": (48 * KB, 3 * MB, 36 * MB),
    "lunarlake": (48 * KB, 2560 * KB, 12 * MB),
    "gracemont": (32 * KB, 512 * KB, 6 * MB), "sierraforest": (32 * KB, 1 * MB, 108 * MB),
    "znver1": (32 * KB, 512 * KB, 8 * MB), "znver2": (32 * KB, 512 * KB, 16 * MB),
    "znver3": (32 * KB, 512 * KB, 32 * MB), "znver4": (32 * KB, 1 * MB, 32 * MB),
    "znver5": (48 * KB, 1 * MB, 32 * MB),
    # AArch64 (NEON): Graviton 2/3/4 and Ampere Altra are neoverse-n1/v1/v2, Ampere One ampere1;
    # boards: Raspberry Pi 3/4/5 cortex-a53/a72/a76, Jetson Nano cortex-a57, Xavier carmel. An L2
    # shared by a cluster counts as its share per core; apple-m*: the performance cores
    "neoverse-n1": (64 * KB, 1 * MB, 32 * MB), "neoverse-n2": (64 * KB, 1 * MB, 32 * MB),
    "neoverse-v1": (64 * KB, 1 * MB, 32 * MB), "neoverse-v2": (64 * KB, 2 * MB, 64 * MB),
    "ampere1": (64 * KB, 2 * MB, 64 * MB),
    "cortex-a53": (32 * KB, 128 * KB, 0), "cortex-a55": (32 * KB, 128 * KB, 1 * MB),
    "cortex-a57": (32 * KB, 512 * KB, 0), "cortex-a72": (32 * KB, 512 * KB, 0),
    "cortex-a76": (64 * KB, 512 * KB, 2 * MB), "cortex-a78": (64 * KB, 512 * KB, 4 * MB),
    "cortex-x1": (64 * KB, 1 * MB, 8 * MB), "carmel": (64 * KB, 1 * MB, 4 * MB),
    "apple-m1": (128 * KB, 3 * MB, 8 * MB), "apple-m2": (128 * KB, 4 * MB, 8 * MB),
}
# any other CPU (an x86 family or ARM core missing above, or no mcpu: LLVM's "generic"): a
# mid-range core's, between a Cortex-A72 and a client x86 core
GENERIC_CACHES = (32 * KB, 512 * KB, 8 * MB)

# Vector FMAs a core issues per cycle at its widest ISA, from the vendors' optimization manuals:
# what sets dense's peak against the sparse kernels' loads and gathers, which the lanes alone do
# not tell (a Zen 4 splits a 512-bit FMA over its two 256-bit units: one a cycle; an Emerald
# Rapids or Zen 5 core has two 512-bit units). A family missing here gets GENERIC_FMA_UNITS.
FMA_UNITS = {
    "haswell": 2, "broadwell": 2, "skylake": 2, "alderlake": 2, "raptorlake": 2,
    "meteorlake": 2, "arrowlake": 2, "arrowlake-s": 2, "lunarlake": 2,
    # Cannon Lake: one 512-bit unit; Gracemont and Sierra Forest (E-cores): two 128-bit units
    "cannonlake": 1, "gracemont": 1, "sierraforest": 1,
    "skylake-avx512": 2, "cascadelake": 2, "cooperlake": 2, "icelake-server": 2,
    "sapphirerapids": 2, "emeraldrapids": 2, "graniterapids": 2,
    "icelake-client": 1, "tigerlake": 1, "rocketlake": 1,
    "znver1": 1, "znver2": 2, "znver3": 2, "znver4": 1, "znver5": 2,
    # NEON: 128-bit FMA pipes
    "neoverse-n1": 2, "neoverse-n2": 2, "neoverse-v1": 4, "neoverse-v2": 4, "ampere1": 2,
    "cortex-a53": 0.5, "cortex-a55": 1, "cortex-a57": 1, "cortex-a72": 1, "cortex-a76": 2,
    "cortex-a78": 2, "cortex-x1": 4, "carmel": 2, "apple-m1": 4, "apple-m2": 4,
}
GENERIC_FMA_UNITS = 2

# Host flags that only server cores with two 512-bit FMA units have. A hypervisor may show its
# guest another CPU model than the host's: a Xeon with AMX (Sapphire Rapids and later, two units)
# has been seen as family 6 model 167, which LLVM names rocketlake (a client core, one unit), and
# the FMA_UNITS of that name halved the roofline of every layer (fma_peak.c measured two).
SERVER_FMA_FLAGS = {"amx_tile": 2}


@dataclass(frozen=True)
class CPU:
    """What the kernels need to know of the CPU they are built for.

    lanes         float32 lanes of a vector register of the widest ISA the target has
    registers     vector registers (32 on AVX-512 and NEON, 16 on AVX2/SSE)
    masked_store  the ISA stores a vector under a lane mask (AVX-512, AVX's vmaskmov)
    compress      the ISA packs selected lanes in one instruction (AVX-512's vcompress)
    fma_units     vector FMAs a core issues per cycle at that width (FMA_UNITS)
    l1d, l2       bytes per core; l3: bytes in all (0: none)
    cores         cores the code runs on (the target's num-cores)
    """

    name: str
    isa: str
    lanes: int
    registers: int
    masked_store: bool
    compress: bool
    fma_units: float
    l1d: int
    l2: int
    l3: int
    cores: int

    @property
    def accumulators(self) -> int:
        """Vector registers a register tile of the direct-style kernels may fill with
        accumulators: half. The rest hold what LLVM keeps live across an unrolled step (the Kw
        weight vectors, the broadcasts). Measured: 16 of 32 best on AVX-512; on AVX2 (haswell
        code, 256->256 3x3 at 56x56) 4 pixels x 2 vectors ran at 218 GFLOP/s, 6 x 2 at 109
        (spills)."""
        return self.registers // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CPU":
        """The description ``to_dict`` wrote; one written before ``fma_units`` existed gets the
        table's value for its name."""
        d = {"fma_units": FMA_UNITS.get(d.get("name"), GENERIC_FMA_UNITS), **d}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def __str__(self) -> str:
        return (f"{self.name} ({self.isa}: {self.lanes} float32 lanes, {self.registers} registers, "
                f"{self.fma_units:g} FMA/cycle; "
                f"L1d {self.l1d // KB} KB, L2 {self.l2 // KB} KB, L3 {self.l3 // MB} MB; {self.cores} cores)")


def _isa(features, arch: str) -> tuple[str, int, int, bool, bool]:
    """(isa, lanes, registers, masked_store, compress) from LLVM's feature names."""
    if arch.startswith(("aarch64", "arm64")):
        return ("neon", 4, 32, False, False) if "neon" in features else ("generic", 1, 32, False, False)
    if "avx512f" in features:
        return "avx512", 16, 32, True, True
    if {"avx2", "fma", "bmi2"} <= features:  # bmi2: the encoders' pext compaction (lanes.py)
        return "avx2", 8, 16, True, False
    if "avx" in features:
        return "avx", 8, 16, True, False
    if "sse2" in features or arch.startswith("x86_64"):
        return "sse", 4, 16, False, False
    return "generic", 1, 16, False, False


def _host_caches() -> tuple[int, int, int] | None:
    """(L1d per core, L2 per core, L3) of this machine from sysfs, or None where it has none."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = {}
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            read = lambda f: open(os.path.join(base, d, f)).read().strip()  # noqa: E731
            if read("type") in ("Data", "Unified"):
                s = read("size")
                sizes[int(read("level"))] = int(s[:-1]) * {"K": KB, "M": MB, "G": 1 << 30}[s[-1]] \
                    if s[-1] in "KMG" else int(s)
    except (OSError, ValueError, KeyError):
        return None
    return (sizes[1], sizes[2], sizes.get(3, 0)) if 1 in sizes and 2 in sizes else None


def _host_fma_units(cpuinfo: str = "/proc/cpuinfo") -> float | None:
    """FMA units the host's own flags prove, or None where they prove none (or there is no
    /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return max((SERVER_FMA_FLAGS[f] for f in flags if f in SERVER_FMA_FLAGS), default=None)


def is_host(target: tvm.target.Target) -> bool:
    """The target is this machine's CPU (same architecture and LLVM cpu name)."""
    return host_arch(target.attrs.get("mtriple")) and str(target.attrs.get("mcpu", "")) == host_cpu()


@functools.lru_cache(maxsize=None)
def _cpu_of(target_str: str) -> CPU:
    target = make_target(target_str)
    if target.kind.name != "llvm":
        raise ValueError(f"the kernels are built for CPUs (kind llvm), not {target.kind.name!r}")
    features = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target)}
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    isa, lanes, regs, masked, compress = _isa(features, triple.split("-")[0])
    name = str(target.attrs.get("mcpu", "") or "generic")
    here = is_host(target)
    caches = (_host_caches() if here else None) or CACHE_DEFAULTS.get(name, GENERIC_CACHES)
    cores = int(target.attrs.get("num-cores", 0) or 0) or (os.cpu_count() or 1)
    fma = FMA_UNITS.get(name, GENERIC_FMA_UNITS)
    if here:
        fma = max(fma, _host_fma_units() or 0)
    return CPU(name, isa, lanes, regs, masked, compress, fma, *caches, cores)


def cpu_of(target=None) -> CPU:
    """The CPU description of a target (None: this machine, as make_target(None))."""
    if isinstance(target, CPU):
        return target
    return _cpu_of(str(make_target(target)))
