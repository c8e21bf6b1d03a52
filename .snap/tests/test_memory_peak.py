"""benchmarks/memory_peak.py's trace replay: the moment of most bytes allocated and what was live then."""

from __future__ import annotations

from benchmarks.memory_peak import peak_blocks, where

ENGINE = [
    {"filename": "/x/site/torch/nn.py", "line": 3, "name": "f"},
    {"filename": "/r/engine/circuit.py", "line": 9, "name": "g"},
]
OTHER = [{"filename": "/x/site/torch/nn.py", "line": 3, "name": "f"}]


def test_peak_is_the_most_bytes_live_and_names_our_frames():
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ENGINE},
        {"action": "alloc", "addr": 2, "size": 50, "frames": OTHER},
        {"action": "free_requested", "addr": 2, "size": 50},  # still counted until the free completes
        {"action": "alloc", "addr": 3, "size": 30, "frames": ENGINE},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 140, "frames": OTHER},  # 170 live: below the peak
    ]
    peak, at, sites = peak_blocks(trace)
    assert (peak, at) == (180, 3)
    assert sites == {"engine/circuit.py:9 g": 130, "/x/site/torch/nn.py:3": 50}
    assert where([]) == "?"
