"""fp8moe.kernels.launch on the CPU: the cache key, and launches through a real ``JITFunction`` /
``Autotuner`` of the installed Triton whose driver and compiler are replaced by fakes (child process), so
that the arguments the direct path hands the compiled kernel's launcher are compared with those Triton's
own ``JITFunction.run`` hands it, call for call. On the GPU, experiments/check_launch.py compares the
outputs of the real kernels bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fp8moe.kernels import launch  # noqa: E402


def _child(code: str, **env: str) -> str:
    """Run ``code`` (a ``-c`` string, or a script's path) in a child process; its output."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", launch.ENV_VAR)}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, *(("-c", code) if "\n" not in code and not code.endswith(".py") else (code,))],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_off_under_the_interpreter_and_by_environment():
    code = (
        "import fp8moe.kernels.launch as L, fp8moe.kernels.plan as P; "
        "print(L.enabled(), L.direct(P._plan_kernel).jit is None, L.set_enabled(True), L.enabled())"
    )
    assert _child(code, TRITON_INTERPRET="1").split() == ["False", "True", "False", "False"]
    assert _child(code, FP8MOE_DIRECT_LAUNCH="0").split() == ["False", "False", "False", "True"]
    assert _child(code).split()[:2] == ["True", "False"]


def test_key_covers_what_triton_specializes_on():
    """Alignment, dtype, int class / ==1 / divisibility, None, constexpr values and options, device, and for
    an autotuned kernel the autotune key's values: each gives a different key; the same call the same."""
    from fp8moe.kernels import gemm, plan

    d = launch.direct(plan._plan_kernel)
    if d.jit is None:
        pytest.skip("the kernels are not JITFunctions here (interpreter)")

    from triton.backends.compiler import BaseBackend  # what native_specialize_impl is given (no GPU here)

    d._backends[0] = d._backends[1] = BaseBackend
    offsets, data = torch.zeros(8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)

    def key(*args, device=0, **kwargs):
        return d.key(device, args, kwargs)

    base = key(offsets, data, 8, 32, 64, BLOCK_E=8, BLOCK_R=16)
    assert base == key(offsets, data.clone(), 8, 32, 64, BLOCK_E=8, BLOCK_R=16)  # another aligned buffer
    assert base == key(offsets, data, 8, 48, 64, BLOCK_E=8, BLOCK_R=16)  # both divisible by 16
    different = [
        key(offsets, data[1:], 8, 32, 64, BLOCK_E=8, BLOCK_R=16),  # misaligned pointer
        key(offsets, data.float(), 8, 32, 64, BLOCK_E=8, BLOCK_R=16),  # dtype
        key(offsets, data, 8, 33, 64, BLOCK_E=8, BLOCK_R=16),  # not divisible by 16
        key(offsets, data, 8, 1, 64, BLOCK_E=8, BLOCK_R=16),  # == 1
        key(offsets, data, 8, 2**31, 64, BLOCK_E=8, BLOCK_R=16),  # i64
        key(offsets, data, 8, 32, 64, BLOCK_E=16, BLOCK_R=16),  # constexpr
        key(offsets, data, 8, 32, 64, BLOCK_E=8, BLOCK_R=16, num_warps=8),  # launch option
        key(offsets, data, 8, 32, 64, BLOCK_E=8, BLOCK_R=16, device=1),  # device
        key(offsets, data, 8, 32, BLOCK_E=8, BLOCK_R=16),  # fewer positional arguments
        key(offsets, None, 8, 32, 64, BLOCK_E=8, BLOCK_R=16),  # None
    ]
    assert len({base, *different}) == len(different) + 1

    tuned = launch.direct(gemm._k_grouped_kernel)
    tuned._backends[0] = BaseBackend
    a, s = torch.zeros(256, dtype=torch.float8_e4m3fn), torch.zeros(4, 128)
    ptrs = torch.zeros(4, dtype=torch.int32)

    def tkey(n, k):  # N and K are the autotune key: their values, not only their specialization, count
        return tuned.key(0, (a, s, a, s, s, ptrs, ptrs, n, k), {"ACCUMULATE": False})

    assert tkey(128, 256) == tkey(128, 256) and tkey(128, 256) != tkey(256, 256) != tkey(128, 384)


# ---- launches through Triton's own JITFunction / Autotuner with a fake driver and compiler -------------

_FAKE = r'''
import warnings
warnings.filterwarnings("error", message="fp8moe direct launch")  # a launcher giving up: an error here
import torch, triton, triton.language as tl
from triton.runtime.driver import driver
from triton.backends.compiler import GPUTarget
from fp8moe.kernels import launch

class FakeDriver:
    device = 0
    stream = 1234
    def get_current_device(self): return self.device
    def get_current_stream(self, device): return self.stream + device
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

fake = FakeDriver()
driver.set_active(fake)

class FakeCompiled:  # what JITFunction.run launches through: .run(grid..., stream, function, meta, ...)
    def __init__(self, key):
        self.function, self.packed_metadata, self.calls = object(), ("meta", key), []
    def launch_metadata(self, grid, stream, *args): return None
    @property
    def run(self): return lambda *a: self.calls.append(a)

compiles = []
def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    compiled = FakeCompiled(key)
    compiles.append(compiled)
    self.device_caches[device][0][key] = compiled
    return compiled

triton.runtime.jit.JITFunction._do_compile = fake_compile

@triton.jit
def plain(x_ptr, n, y_ptr, other, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
    pass

def boxes(nargs):  # like the GEMM's pre-hook: it edits an argument object per config
    nargs["x_ptr"].tag = nargs["BLOCK"]

configs = [triton.Config({"BLOCK": b}, num_warps=w, pre_hook=boxes) for b, w in ((16, 4), (32, 8), (64, 4))]

@triton.autotune(configs=configs, key=["n"])
@triton.jit
def tuned(x_ptr, n, y_ptr, other, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
    pass

# the autotuner "times" config i as 3 - i (the last wins); no GPU
tuned._bench = lambda *args, config, **meta: [float(3 - configs.index(config))] * 3

def launches(kernel, grid, *args, direct, **kwargs):
    """(compiled kernel, the arguments its launcher got) of one launch, direct or Triton's own."""
    before = {id(c): len(c.calls) for c in compiles}
    launch.set_enabled(direct)
    got = launch.direct(kernel)[grid](*args, **kwargs)
    launch.set_enabled(True)
    new = [c for c in compiles if len(c.calls) > before.get(id(c), 0)]
    assert len(new) == 1 and len(new[0].calls) == before.get(id(new[0]), 0) + 1, "exactly one launch"
    assert got is new[0]
    return new[0], new[0].calls[-1]

def same(a, b):
    assert len(a) == len(b), (len(a), len(b))
    for i, (u, v) in enumerate(zip(a, b)):
        assert u is v or (type(u) is type(v) and not isinstance(u, torch.Tensor) and u == v), (i, u, v)

x, y, z = torch.zeros(64), torch.zeros(64), torch.zeros(64, dtype=torch.int32)
grid = lambda meta: (64 // meta["BLOCK"], 2)
for kernel, kwargs in ((plain, {"BLOCK": 16}), (plain, {"BLOCK": 16, "FLAG": 5, "num_warps": 8}), (tuned, {})):
    n_compiles = len(compiles)
    first, args_first = launches(kernel, grid, x, 32, y, 7, direct=True, **kwargs)  # new: through Triton
    assert len(compiles) >= n_compiles + 1
    again, args_direct = launches(kernel, grid, x, 32, y, 9, direct=True, **kwargs)  # cached: direct
    theirs, args_triton = launches(kernel, grid, x, 32, y, 9, direct=False, **kwargs)  # Triton's own
    assert again is first is theirs
    same(args_direct, args_triton)
    # a keyword argument that is no constexpr is taken from each call
    _, a = launches(kernel, (3,), x, 32, y, other=11, direct=True, **kwargs)
    _, a2 = launches(kernel, (3,), x, 32, y, other=12, direct=True, **kwargs)
    _, t2 = launches(kernel, (3,), x, 32, y, other=12, direct=False, **kwargs)
    same(a2, t2)

# the autotuner picked the last config; its pre-hook ran on the direct path too
assert tuned.best_config is configs[2]
x.tag = None
_, a = launches(tuned, grid, x, 32, y, 7, direct=True)
assert x.tag == 64 and a[0] == 1 and a[1] == 2

# a new specialization (misaligned pointer, another dtype, n == 1, another device) goes through Triton
for args in ((x[1:], 32, y, 7), (x, 32, z, 7), (x, 1, y, 7)):
    n_compiles = len(compiles)
    c, a = launches(plain, (1,), *args, direct=True, BLOCK=16)
    assert len(compiles) == n_compiles + 1, args
fake.device = 1
n_compiles = len(compiles)
c, a = launches(plain, (1,), x, 32, y, 7, direct=True, BLOCK=16)
assert len(compiles) == n_compiles + 1 and a[3] == 1235
fake.device = 0

# a test that narrows the autotuner's configs (and clears its cache) gets that config, never the cached one
saved = tuned.configs
for i, config in enumerate(saved):
    tuned.configs = [config]
    tuned.cache.clear()
    _, a = launches(tuned, grid, x, 32, y, 7, direct=True)
    _, b = launches(tuned, grid, x, 32, y, 7, direct=True)
    assert a[-2] == b[-2] == config.kwargs["BLOCK"] and a[0] == 64 // config.kwargs["BLOCK"], (i, a[-3:])
tuned.configs = saved
tuned.cache.clear()

# a launch hook (a profiler) sends every launch through Triton: then the hook sees it
def no_direct(*args):
    raise AssertionError("a direct launch while a launch hook is installed")
direct_launch, launch.DirectLauncher._launch = launch.DirectLauncher._launch, no_direct
hook = lambda metadata: None
triton.knobs.runtime.launch_enter_hook.add(hook)
launches(plain, grid, x, 32, y, 7, direct=True, BLOCK=16)
triton.knobs.runtime.launch_enter_hook.remove(hook)
launch.DirectLauncher._launch = direct_launch
print("ok", len(compiles))
'''


def test_direct_launch_hands_the_launcher_what_triton_does(tmp_path):
    script = tmp_path / "fake_launches.py"  # @triton.jit needs its source in a file
    script.write_text(_FAKE)
    out = _child(str(script))
    assert out.startswith("ok"), out
