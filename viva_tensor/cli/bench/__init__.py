"""The benchmarks' cores, run by ``viva-tensor bench`` and by the scripts in ``benchmarks/``.

- :mod:`viva_tensor.cli.bench.attention`: blockwise flash attention against ``jax.nn.dot_product_attention``.
- :mod:`viva_tensor.cli.bench.quant`: every quantization format's size, error, throughput and ``quant.dot``.

Times come from :func:`viva_tensor._benchmarking.time_fn` (one timer, one statistic for everything).
"""
