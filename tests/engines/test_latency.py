"""The recent-latency window every engine reports in EngineLoad."""

from __future__ import annotations

from server.engines.latency import RecentLatency


def test_a_stream_gives_its_ttft_and_the_time_per_token_after_the_first():
    latency = RecentLatency()
    assert latency.ttft_ms() is None and latency.itl_ms() is None
    # First text 0.25 s after the start; 4 more tokens over the next 0.5 s.
    latency.add_stream(t_start=10.0, t_first=10.25, t_last=10.75, tokens=5)
    assert latency.ttft_ms() == 250.0
    assert latency.itl_ms() == 125.0


def test_streams_without_text_or_a_second_token_add_no_inter_token_sample():
    latency = RecentLatency()
    latency.add_stream(t_start=1.0, t_first=None, t_last=None, tokens=0)
    assert latency.ttft_ms() is None
    latency.add_stream(t_start=1.0, t_first=1.5, t_last=1.5, tokens=1)
    latency.add_stream(t_start=1.0, t_first=1.5, t_last=1.5, tokens=3)  # all in one delta
    assert latency.ttft_ms() == 500.0 and latency.itl_ms() is None


def test_medians_cover_only_the_window():
    latency = RecentLatency(window=3)
    for ms in (1000.0, 10.0, 20.0, 30.0):
        latency.add_ttft_ms(ms)
        latency.add_itl_ms(ms / 10)
    # The 1000 ms outlier has left the window.
    assert latency.ttft_ms() == 20.0 and latency.itl_ms() == 2.0
