"""Statistics and the timing loop, with fake timers and clocks: nothing here depends on real speed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clipdeploy.benchmarks.harness import (
    TimingConfig,
    measure,
    peak_rss_mb,
    reset_peak_rss,
    summarize,
)
from clipdeploy.errors import UsageError


def test_summarize_known_samples():
    # 1..100 ms: linear-interpolated percentiles are 50.5, 90.1 and 99.01 ms.
    stats = summarize([i / 1e3 for i in range(1, 101)], batch=8)
    assert stats.iters == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.min_ms == pytest.approx(1.0) and stats.max_ms == pytest.approx(100.0)
    assert stats.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert stats.items_per_s == pytest.approx(8 / 0.0505)


def test_summarize_is_order_free_and_matches_numpy():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(-4, 0.3, size=37)
    a = summarize(samples, batch=1)
    b = summarize(samples[::-1], batch=1)
    for field, value in a.to_dict().items():
        assert getattr(b, field) == pytest.approx(value, rel=1e-12), field
    assert a.p90_ms == pytest.approx(np.percentile(samples * 1e3, 90))


def test_summarize_single_sample_and_errors():
    s = summarize([0.002], batch=4)
    assert s.p50_ms == s.p99_ms == s.mean_ms == pytest.approx(2.0)
    assert s.std_ms == 0.0
    assert s.items_per_s == pytest.approx(2000)
    with pytest.raises(ValueError, match="no timed samples"):
        summarize([], batch=1)
    with pytest.raises(ValueError, match="batch"):
        summarize([0.1], batch=0)


def test_measure_excludes_warmup_and_times_each_call():
    calls = []
    timed = []

    def fn():
        calls.append(1)

    def timer(f):
        f()
        timed.append(len(calls))
        return 0.001 * len(timed)

    samples = measure(fn, TimingConfig(iters=5, warmup=3), timer=timer)
    assert len(calls) == 8  # 3 warm-up + 5 timed
    assert timed == [4, 5, 6, 7, 8]  # the timer never saw a warm-up call
    assert samples == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])


def test_measure_stops_at_the_budget_but_not_before_min_iters():
    clock = itertools.count(0.0, 10.0)  # every reading is 10 s later than the one before
    samples = measure(
        lambda: None,
        TimingConfig(iters=100, warmup=0, max_seconds=1.0, min_iters=4),
        timer=lambda f: (f(), 0.5)[1],
        clock=lambda: next(clock),
    )
    assert len(samples) == 4


def test_timing_config_refuses_bad_values():
    with pytest.raises(UsageError, match="--iters 0"):
        TimingConfig(iters=0)
    with pytest.raises(UsageError, match="--warmup -1"):
        TimingConfig(warmup=-1)
    with pytest.raises(UsageError, match="--max-seconds"):
        TimingConfig(max_seconds=0)


def test_peak_rss_is_read():
    reset_peak_rss()  # allowed to fail (returns False) where the kernel refuses
    assert peak_rss_mb() > 1


def test_environment_block():
    from clipdeploy.benchmarks.environment import collect, describe_machine

    env = collect(threads=3, device="cpu")
    assert env["threads"] == 3 and env["device"] == "cpu" and env["gpus"] == []
    assert env["available_cores"] >= 1 and env["cpu"]
    assert isinstance(env["cpu_flags"], list)
    assert "numpy" in env["versions"] and "python" in env["versions"]
    assert f"{env['available_cores']} cores" in describe_machine(env)
