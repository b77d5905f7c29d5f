"""clients/percentiles.py: the one percentile definition every latency table uses."""

from __future__ import annotations

import pytest

from clients.percentiles import percentile, percentiles, summarize


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([10, 20], 25) == pytest.approx(12.5)


def test_percentile_rejects_a_bad_q():
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    with pytest.raises(ValueError):
        percentile([1, 2], -1)


def test_percentiles_and_summary():
    assert percentiles([3, 1, 2]) == {"p50": 2.0, "p95": pytest.approx(2.9), "p99": pytest.approx(2.98)}
    s = summarize([5, 1, 3])
    assert s == {"count": 3, "min": 1.0, "mean": 3.0, "p50": 3.0, "p95": pytest.approx(4.8),
                 "p99": pytest.approx(4.96), "max": 5.0}
    empty = summarize([])
    assert empty["count"] == 0 and empty["p50"] is None and empty["max"] is None


def test_percentile_matches_numpys_default_definition():
    # NumPy's "linear" method is the definition the README's tables were computed with.
    numpy = pytest.importorskip("numpy")
    rng = numpy.random.default_rng(7)
    values = rng.exponential(200.0, size=257).tolist()
    for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_presorted_skips_the_sort_and_keys_follow_qs():
    assert percentile([1, 2, 10], 50, presorted=True) == 2.0
    assert percentiles(range(11), qs=(10, 99.5)) == {"p10": 1.0, "p99.5": pytest.approx(9.95)}


def test_no_other_client_module_defines_its_own_percentile():
    import ast
    from pathlib import Path

    import clients

    for path in Path(clients.__file__).parent.glob("*.py"):
        if path.name == "percentiles.py":
            continue
        defined = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.FunctionDef)}
        assert not defined & {"percentile", "percentiles"}, path
