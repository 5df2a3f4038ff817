"""benchmarks/recipe_runs.py, which the CPU quality scripts share: a study reads a run's output folder only when
that folder holds a run of the study's command, else the committed result of the same command, else it stops."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_runs  # noqa: E402

RECIPE = "recipes/smollm2-135m/lst.yaml"
ARGV = [RECIPE, "--learning_rate", "5e-2", "--output_dir", "outputs/study-run", "--lst_merge", "none"]
COMMAND = "trainer-plugins train " + " ".join(ARGV)


def results(learning_rate=0.05, recipe=RECIPE, loss=1.5):
    return {"recipe": recipe, "before": {"eval_loss": 2.0}, "after": {"eval_loss": loss}, "train": {"steps": 60},
            "config": {"model": {"dtype": "float32"},
                       "train": {"output_dir": "outputs/study-run", "learning_rate": learning_rate, "lst_merge": "none"}}}


@pytest.mark.parametrize("recorded, expected", [
    (results(), []),
    (results(learning_rate=0.02), ["learning_rate 0.02, not '5e-2'"]),
    (results(recipe="recipes/smollm2-135m/lora.yaml"), ["recipe recipes/smollm2-135m/lora.yaml"]),
    ({**results(), "config": {"train": {"learning_rate": 0.05, "output_dir": "outputs/study-run"}}},
     ["lst_merge not recorded"]),
])
def test_contradictions_compare_the_recorded_config_with_the_command(recorded, expected):
    assert recipe_runs.contradictions(recorded, ARGV) == expected


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A repository root of its own: an output folder and a committed result file under tmp_path."""
    monkeypatch.setattr(recipe_runs, "ROOT", tmp_path)
    folder = tmp_path / "outputs" / "study-run"
    committed = tmp_path / "committed.json"
    return folder, committed


def write_folder(folder, run):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(run))


def commit(committed, command=COMMAND, loss=1.25):
    committed.write_text(json.dumps({"date": "2026-11-01", "commands": {"run": command},
                                     "runs": {"run": {"after": {"eval_loss": loss}}}}))


def test_a_folder_of_the_same_command_is_read(study):
    folder, committed = study
    write_folder(folder, results(loss=1.5))
    commit(committed, loss=1.25)
    out = recipe_runs.run_recipes({"run": ARGV}, skip_train=True, previous=committed)
    assert out["runs"]["run"]["after"] == {"eval_loss": 1.5} and "reused" not in out


def test_a_folder_of_another_command_gives_way_to_the_committed_run(study):
    folder, committed = study
    write_folder(folder, results(learning_rate=0.02, loss=1.5))
    commit(committed, loss=1.25)
    out = recipe_runs.run_recipes({"run": ARGV}, skip_train=True, previous=committed)
    assert out["runs"]["run"] == {"after": {"eval_loss": 1.25}} and out["reused"] == {"run": "2026-11-01"}


def test_a_folder_of_another_command_without_a_committed_run_stops_the_study(study):
    folder, committed = study
    write_folder(folder, results(learning_rate=0.02))
    commit(committed, command=COMMAND + " --max_steps 30")  # the committed run is not this command either
    with pytest.raises(SystemExit, match=r"does not hold a run of .*learning_rate 0.02, not '5e-2'.*--only run"):
        recipe_runs.run_recipes({"run": ARGV}, skip_train=True, previous=committed)
