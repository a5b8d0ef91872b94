"""Benchmarks behind `bitnet-jax bench`: the train step (`train`), kernels and generation (`serve`)."""
