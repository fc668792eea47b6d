"""JAX adapter for fp8moe (see jax_bridge.grouped_mm)."""
