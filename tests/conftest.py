import pytest


@pytest.fixture
def jax_on_cpu():
    """Run the test's JAX computations on the CPU even where JAX sees a GPU: for comparisons with torch
    models evaluated on the CPU, where a GPU's different fusion and rounding choices are not the subject."""
    jax = pytest.importorskip("jax")
    with jax.default_device(jax.devices("cpu")[0]):
        yield
