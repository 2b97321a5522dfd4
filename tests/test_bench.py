"""Tests of bench.py: products_seconds, the time a call spends in matrix products."""

import torch


def test_bench_products_seconds_counts_matrix_products_and_nothing_else():
    # bench.py's "its products" columns: a call that is one big product spends almost all
    # its time in products; a call of element-wise work spends none there.
    import bench
    a = torch.randn(512, 512)
    prod_s, total_s = bench.products_seconds(lambda: [a @ a for _ in range(4)])
    assert 0 < prod_s <= total_s, (prod_s, total_s)            # no ratio: no timing assertion
    lin = torch.nn.Linear(512, 512)                           # addmm, counted too
    assert bench.products_seconds(lambda: lin(a))[0] > 0
    assert bench.products_seconds(lambda: [a * a + 1 for _ in range(4)])[0] == 0
