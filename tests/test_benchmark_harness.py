"""The benchmark harness runs every method end to end (tiny shape, CPU) and writes its report.
It measures nothing here: numbers come from GPU runs committed under benchmarks/results/."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def test_every_method_runs_and_the_report_is_complete(tmp_path):
    out = tmp_path / "r.json"
    assert harness.main(["--shape", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == list(harness.METHODS)
    for key in ("device", "date", "command", "torch", "shape", "dtype"):
        assert report[key]
    for r in report["results"]:
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["step_vs_adamw"] > 0
    # random tokens over 1000 ids: three small steps leave every method's loss near ln(1000) = 6.9
    losses = {r["method"]: r["final_loss"] for r in report["results"]}
    assert all(6.0 < v < 7.5 for v in losses.values())
