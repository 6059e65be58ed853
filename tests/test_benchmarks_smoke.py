"""Smoke tests for the benchmark scripts: each runs in --quick mode and ends its stdout with the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess

from helpers import PYTHON, REPO


def run_quick(script: str, out_path) -> dict:
    """Run benchmarks/<script> --quick --out <out_path>; return the JSON object on its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / script), "--quick", "--out", str(out_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_path.read_text()) == report
    return report


def test_relation_loss_benchmark(tmp_path):
    report = run_quick("relation_loss.py", tmp_path / "results" / "relation_loss.json")
    assert report["benchmark"] == "relation_loss"
    assert {"device", "memory_method", "results"} <= report.keys()
    assert report["results"], "no rows"
    for row in report["results"]:
        assert set(row) == {
            "seq_len", "time_ratio", "mem_ratio", "project_ms", "reference_ms", "project_peak_mib",
            "reference_peak_mib",
        }  # fmt: skip
        assert row["project_ms"] > 0 and row["reference_ms"] > 0
        assert row["reference_peak_mib"] > 0
