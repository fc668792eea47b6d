"""Backend selection: "auto" rules, the FP8MOE_BACKEND override, explicit names never swapped, and
optional-dependency failures (deep_gemm absent or broken) reported instead of crashing."""

import subprocess
import sys
import types

import pytest
import torch

import fp8moe
from fp8moe import backends
from fp8moe.backends import ENV_VAR, select_backend


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget imported backends so that monkeypatched imports take effect (and are forgotten afterwards)."""
    for name in ("fp8moe.backends.deepgemm",):
        monkeypatch.delitem(sys.modules, name, raising=False)
    caches = (backends._module, backends._select, backends.load_backend)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


@pytest.fixture
def fake_sm90(monkeypatch, tmp_path, fresh_registry):
    """Pretend deep_gemm imports, the device is an SM90 GPU and the CUDA toolkit is present."""
    monkeypatch.setitem(sys.modules, "deep_gemm", types.ModuleType("deep_gemm"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def test_wgrad_provider_is_an_option_of_the_backend():
    backend, _ = select_backend("reference", torch.device("cpu"), wgrad="reference")
    assert backend.key == "reference" and backend.wgrad == "reference"
    assert backends.backend_key("deepgemm", "triton") == "deepgemm/wgrad=triton"
    with pytest.raises(ValueError, match="wgrad: unknown wgrad provider 'cutlass'"):
        select_backend("reference", torch.device("cpu"), wgrad="cutlass")
    with pytest.raises(TypeError, match="wgrad: expected None or a str, got list"):
        select_backend("reference", torch.device("cpu"), wgrad=["triton"])
    with pytest.raises(TypeError, match="backend: expected a str, got list"):
        select_backend(["reference"], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="wgrad provider 'triton': needs a CUDA device"):
        select_backend("reference", torch.device("cpu"), wgrad="triton")


def test_selection_is_resolved_once_per_device(monkeypatch):
    """The second call resolves from the cache: nothing is probed again."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    backends._select.cache_clear()
    select_backend("auto", torch.device("cpu"))
    probes = []
    monkeypatch.setattr(backends, "_unavailable_reason", lambda *args: probes.append(args))
    assert select_backend("auto", torch.device("cpu"))[0].name == "reference" and not probes


def test_auto_on_cpu_is_reference_with_a_reason(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    backend, reason = select_backend("auto", torch.device("cpu"))
    assert backend.name == "reference"
    assert "cpu" in reason
    info = fp8moe.backend_info("cpu")
    assert info["auto"] == "reference" and info["backends"]["reference"] is None
    assert "needs a CUDA device" in info["backends"]["deepgemm"] or "import" in info["backends"]["deepgemm"]


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend("auto", torch.device("cpu"))[1].endswith(f"environment variable {ENV_VAR}")
    assert fp8moe.backend_info("cpu")["auto"] == "reference"
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR}: unknown backend 'fastest'"):
        select_backend("auto", torch.device("cpu"))


def test_environment_variable_does_not_override_an_explicit_name(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "deepgemm")
    assert select_backend("reference", torch.device("cpu"))[0].name == "reference"


@pytest.mark.parametrize("name", ["deepgemm", "triton"])
def test_explicit_backend_that_cannot_run_raises_instead_of_swapping(name):
    with pytest.raises(RuntimeError, match=f"argument backend: backend '{name}' cannot run: "):
        select_backend(name, torch.device("cpu"))
    x, w = torch.randn(256, 128), torch.randn(2, 128, 128)
    with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
        fp8moe.grouped_mm(x, w, torch.tensor([100, 256], dtype=torch.int32), backend=name)


def test_importing_fp8moe_and_the_bridge_never_imports_deep_gemm():
    """In a fresh interpreter where `import deep_gemm` fails, importing everything public still works."""
    code = (
        "import sys; sys.modules['deep_gemm'] = None\n"  # None in sys.modules: `import deep_gemm` raises
        "import fp8moe, fp8moe.moe, fp8moe.ops, fp8moe.quant\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('jax'): import jax_bridge, jax_bridge.moe\n"
        "assert 'fp8moe.backends.deepgemm' not in sys.modules\n"
        "print(fp8moe.backend_info('cpu')['backends']['deepgemm'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "import of fp8moe.backends.deepgemm failed" in proc.stdout


def test_deep_gemm_absent_is_reported_not_raised(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # makes `import deep_gemm` raise ImportError
    info = fp8moe.backend_info("cpu")
    assert "import of fp8moe.backends.deepgemm failed" in info["backends"]["deepgemm"]
    assert "deep_gemm" in info["backends"]["deepgemm"]
    with pytest.raises(RuntimeError, match="import of fp8moe.backends.deepgemm failed"):
        select_backend("deepgemm", torch.device("cuda"))


def test_deep_gemm_broken_at_import_is_reported(monkeypatch, tmp_path, fresh_registry):
    """An installed deep_gemm whose extension fails to load (ABI mismatch) is reported, not raised."""
    package = tmp_path / "deep_gemm"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('_C.so: undefined symbol: _ZN3c10 (ABI mismatch)')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deep_gemm", raising=False)
    reason = fp8moe.backend_info("cpu")["backends"]["deepgemm"]
    assert reason.startswith("import of fp8moe.backends.deepgemm failed: OSError: _C.so: undefined symbol")


def test_deepgemm_needs_sm90_exactly(fake_sm90):
    from fp8moe.backends.deepgemm import unavailable_reason

    cuda = torch.device("cuda", 0)
    assert unavailable_reason(cuda) is None
    for capability in [(10, 0), (8, 0), (12, 0)]:
        fake_sm90["value"] = capability
        assert "needs an SM90 GPU" in unavailable_reason(cuda)


def test_deepgemm_needs_the_cuda_toolkit(fake_sm90, monkeypatch, tmp_path):
    from fp8moe.backends import deepgemm

    deepgemm._cuda_toolkit_reason.cache_clear()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert "CUDA toolkit" in deepgemm.unavailable_reason(torch.device("cuda", 0))


def test_auto_prefers_deepgemm_on_sm90_then_falls_back(fake_sm90, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    cuda = torch.device("cuda", 0)
    assert select_backend("auto", cuda)[0].name == "deepgemm"
    fake_sm90["value"] = (10, 0)
    backends._select.cache_clear()
    backend, reason = select_backend("auto", cuda)
    assert backend.name != "deepgemm"
    assert "deepgemm skipped (needs an SM90 GPU" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report where torch sees no GPU")
def test_a_cuda_device_torch_cannot_see_is_reported_not_raised(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    info = fp8moe.backend_info("cuda")
    assert "torch sees none" in info["backends"]["triton"] and info["auto"] == "reference"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: needs a CUDA device, but torch sees none"):
        select_backend("triton", torch.device("cuda"))


def test_auto_in_the_environment_variable_means_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    info = fp8moe.backend_info("cpu")
    assert info["auto"] == "reference" and info["reason"].startswith("auto on cpu")
    assert select_backend("auto", torch.device("cpu"))[0].name == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_m_grouped_padded_output_keeps_the_padded_layout(dtype):
    """padded=True returns (Mp, N) with the groups' rows where the plan put them and zero elsewhere."""
    from fp8moe.backends import load_backend
    from fp8moe.testing import random_problem

    backend = load_backend("reference")
    x, w, offsets, _ = random_problem(3, m=300, n=128, k=256, e=4, routing={"empty_groups": 1, "tail_rows": 7})
    plan = fp8moe.plan_groups(offsets, x.shape[0])
    wq, sw, _, _ = backend.quantize_weight(w, False)
    xq, sx = backend.quantizer.tokens(x, plan, True, False)
    y = backend.m_grouped(xq, sx, wq, sw, plan, dtype, None)
    yp = backend.m_grouped(xq, sx, wq, sw, plan, dtype, None, padded=True)
    assert yp.shape == (plan.num_padded_rows, 128) and yp.dtype == dtype
    routed = plan.row_to_padded[: int(offsets[-1])].long()
    assert torch.equal(yp[routed], y[: int(offsets[-1])])
    outside = torch.ones(plan.num_padded_rows, dtype=torch.bool)
    outside[routed] = False
    assert not yp[outside].any()
    out = torch.full_like(yp, float("nan"))
    assert backend.m_grouped(xq, sx, wq, sw, plan, dtype, out, padded=True) is out and torch.equal(out, yp)
