"""`expertmesh bench chaos`: the comparison and report logic (fast), and one small run that
kills a dense replica under load (slow): no request fails and every output is unchanged."""

from __future__ import annotations

import json

import pytest

from cluster.bench import chaos
from workers.make_checkpoint import make_checkpoint


def _stream(ids: list[int], status: int = 200, error: str = "") -> chaos.Stream:
    return chaos.Stream(ids=ids, times=[1.0, 2.5], start=0.5, end=3.0, status=status, error=error)


def test_compare_counts_equal_near_ties_and_differences():
    base = [_stream([1, 2, 3]), _stream([4, 5, 6]), _stream([7, 8, 9]), _stream([1, 1, 1])]
    got = [_stream([1, 2, 3]), _stream([4, 9, 9]), _stream([7, 8, 0]), _stream([], 503, "x")]
    margins = {(1, 1): 5e-4, (2, 2): 0.5}  # (stream, first differing position) -> margin
    equal, near, diff = chaos._compare(got, base, lambda i, k: margins[(i, k)])
    assert (equal, near, diff) == (1, 1, 1)  # the failed stream is not compared
    assert got[0].max_gap() == pytest.approx(1.5) and not got[3].ok


def test_latencies_of_the_streams_in_flight_at_the_fault():
    early = chaos.Stream(ids=[1], times=[0.4], start=0.0, end=0.5, status=200)
    late = chaos.Stream(ids=[1], times=[2.0], start=1.0, end=4.0, status=200)
    lat, gaps = chaos._latencies([early, late], fired=2.0)
    assert lat == [3.0] and gaps == [1.0]


def test_fault_names_are_checked(tmp_path):
    s = chaos.Settings(model_dir=str(tmp_path), faults=("meteor",))
    with pytest.raises(ValueError, match="unknown fault 'meteor'"):
        chaos.run(s, lambda *a: None, tmp_path)
    s = chaos.Settings(model_dir=str(tmp_path), faults=("node",), nodes=1)
    with pytest.raises(ValueError, match="--nodes >= 2"):
        chaos.run(s, lambda *a: None, tmp_path)


@pytest.mark.slow
def test_dense_replica_kill_under_load_fails_nothing(tmp_path):
    from deploy.app import build_app

    model = make_checkpoint(tmp_path / "tiny", preset="tiny", seed=2)
    settings = chaos.Settings(
        model_dir=str(model), shards=1, streams=6, max_tokens=24, prompt_len=(4, 12),
        dense_replicas=2, faults=("dense-kill",), security=False,
    )  # fmt: skip
    out = chaos.run(settings, build_app, tmp_path / "out")
    (fault,) = out["faults"]
    assert fault["failed"] == 0, fault["errors"]
    assert fault["equal"] + fault["near_ties"] == 6 and fault["different"] == 0
    assert fault["recovery_s"] is not None and fault["recovery_s"] > 0
    saved = json.loads((tmp_path / "out" / "chaos.json").read_text())
    assert saved["faults"][0]["target"].startswith("SERVE_REPLICA::")
    assert "| dense-kill |" in (tmp_path / "out" / "chaos.md").read_text()
