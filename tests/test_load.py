"""Load, the short version of bench/soak.py (`python -m bench.soak` runs it for 10 minutes):
8 kdamonds × 1000 regions at 5 ms sampling, 16 fast and 4 slow subscribers, 20 s.

Memory stays flat, fast subscribers see every snapshot, Get answers in < 50 ms
(p99), every kdamond is still on at the end and the log has no error.
"""

from __future__ import annotations

from bench.soak import run_soak

DURATION_S = 20.0


async def test_soak_20_seconds() -> None:
    result = await run_soak(DURATION_S, rss_every_s=2.0, get_every_s=0.02)
    report = result.markdown()
    assert result.daemon_alive and result.all_on, report
    assert not result.daemon_log_problems, result.daemon_log_problems
    assert result.regions_per_snapshot >= 900, report
    # every fast subscriber got every snapshot of every context, in order
    assert result.fast_gaps == 0, report
    expected = 0.5 * result.aggregations_per_s * result.kdamonds * DURATION_S
    assert min(result.fast_received) > expected, report
    # memory: flat once running (the first sample is taken as the kdamonds start)
    assert result.rss_growth_mib < 16, report
    assert result.get_p99_ms < 50, report
