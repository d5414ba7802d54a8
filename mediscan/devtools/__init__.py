"""Development helpers shared by the tests and the benchmarks (synthetic data, real servers, the browser).

Not part of the product: no module of the product imports them.
"""
