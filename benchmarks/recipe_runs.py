"""Shared by the CPU quality scripts: run named `trainer-plugins train` commands (or read the outputs of
earlier runs) and collect each run's results.json."""

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_arguments(description: str, result_name: str):
    """The quality scripts' command line: --skip-train, --out (benchmarks/results/RESULT_NAME), --steps, --only."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--skip-train", action="store_true", help="only read the outputs of earlier runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / result_name))
    parser.add_argument("--steps", type=int, help="max_steps of every run (default: the recipes' 60)")
    parser.add_argument("--only", nargs="*", help="run only these (the others are read from earlier outputs, or from --out's runs of the same command)")
    return parser.parse_args()


def run_recipes(runs: dict, steps=None, skip_train=False, only=None, previous=None) -> dict:
    """``runs``: name -> `trainer-plugins train` arguments (with --output_dir). Trains each (unless
    ``skip_train``, or ``only`` names others), then returns the device, date, the exact commands and
    each run's before/after/train, trainable parameters and last sample.

    A run not trained now whose output folder is gone (a fresh clone) is taken from ``previous`` (the committed
    result file) when that file ran the same command: the runs are deterministic, so adding one run to a study
    does not retrain the others. Such runs are listed under "reused" with the date they ran. An output folder
    whose results.json records another command (recipe or an override) is never read as this one's: the
    committed run of this command is taken instead, or the study stops and names the run to train."""
    result = {"device": f"CPU ({platform.processor() or platform.machine()})", "date": time.strftime("%Y-%m-%d"),
              "commands": {}, "runs": {}}
    earlier = json.loads(Path(previous).read_text()) if previous and Path(previous).is_file() else {}
    if "commands_note" in earlier:  # what a reused run's command meant when it ran
        result["commands_note"] = earlier["commands_note"]
    for name, argv in runs.items():
        argv = argv + (["--max_steps", str(steps)] if steps and "--max_steps" not in argv else [])  # a run's own wins
        command = "trainer-plugins train " + " ".join(argv)
        result["commands"][name] = command
        if not skip_train and (not only or name in only):
            subprocess.run([sys.executable, "-m", "trainer_plugins", "train", *argv], cwd=ROOT, check=True)
        out = ROOT / argv[argv.index("--output_dir") + 1]
        run = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
        differs = contradictions(run, argv) if run else ["no results.json"]
        if differs and earlier.get("commands", {}).get(name) == command:
            result["runs"][name] = earlier["runs"][name]
            result.setdefault("reused", {})[name] = earlier.get("reused", {}).get(name, earlier.get("date"))
            continue
        if differs:  # an output folder left by another command must not stand in for this one
            raise SystemExit(f"{name}: {out} does not hold a run of `{command}` ({'; '.join(differs)}): "
                             f"train it (--only {name}) or remove the folder")
        result["runs"][name] = {
            "before": run["before"], "after": run["after"], "train": run["train"],
            "trainable_parameters": (run.get("memory") or {}).get("trainable_parameters"),
            "sample_after": run.get("sample_after"),
        }
    return result


def contradictions(run: dict, argv: list[str]) -> list[str]:
    """What a run's results.json (its recipe and resolved config) says against ``argv`` (a recipe, then
    ``--key value`` overrides): empty when the run is one of this command."""
    from trainer_plugins.recipes import parse_overrides

    recorded = {k: v for section in (run.get("config") or {}).values() if isinstance(section, dict)
                for k, v in section.items()}
    out = [] if run.get("recipe") == argv[0] else [f"recipe {run.get('recipe')}"]
    for key, value in parse_overrides(argv[1:]).items():
        if key not in recorded:
            out.append(f"{key} not recorded")
        elif not _same(recorded[key], value):
            out.append(f"{key} {recorded[key]!r}, not {value!r}")
    return out


def _same(recorded, given) -> bool:
    """A recorded (parsed) value against a command-line one: "5e-2" reaches the Trainer as 0.05."""
    if recorded == given:
        return True
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        try:
            return float(given) == float(recorded)
        except (TypeError, ValueError):
            return False
    return False
