"""Benchmarks: `jaxvae bench` (the harness, JAX vs a PyTorch reference), data loading, training."""
