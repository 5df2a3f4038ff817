"""The plugin x setup matrix: the README's table is the one the declarations give, every cell a plugin
(or a pair) declares has a test that exists, and every other cell is refused before any model loads."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer_plugins import PluginConfigError
from trainer_plugins.manager import BUILTIN, get_host
from trainer_plugins.matrix import README_END, README_START, REFUSAL_TEST, markdown, rows
from trainer_plugins.spec import CELLS, run_setup

ROOT = Path(__file__).resolve().parents[1]
OURS = ("apollo", "loram", "lst", "meft", "sparse")
SWITCH = {"apollo": "mini", "loram": "lora", "lst": True, "meft": "meft1", "sparse": "magnitude"}


def test_readme_holds_the_generated_matrix():
    text = (ROOT / "README.md").read_text()
    table = text[text.index(README_START) + len(README_START):text.index(README_END)].strip()
    assert table == markdown(get_host()), \
        "the README's matrix is stale: run `trainer-plugins matrix --update-readme README.md`"


def test_our_plugins_are_all_in_the_matrix():
    names = {r["name"] for r in rows(get_host())}
    assert set(OURS) <= names and "apollo + sparse" in names


def test_every_working_cell_names_a_test_that_exists():
    ids = {cell["evidence"] for row in rows(get_host()) for cell in row["cells"].values() if cell["works"]}
    missing = [(row["name"], c) for row in rows(get_host()) for c, cell in row["cells"].items()
               if cell["works"] and not cell["evidence"] and row["name"].split(" + ")[0] in OURS]
    assert not missing, f"working cells without a test: {missing}"
    files = sorted({i.split("::")[0] for i in ids} | {REFUSAL_TEST.split("::")[0]})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                               cwd=ROOT, capture_output=True, text=True, timeout=300).stdout.splitlines()
    # a test id, or a parametrized test's name standing for all its cases
    absent = [i for i in ids | {REFUSAL_TEST} if not any(c == i or c.startswith(i + "[") for c in collected)]
    assert not absent, f"evidence names tests that do not exist: {absent}"


def setups():
    """(plugins switched on, cell) for every row of the matrix and every cell."""
    for row in rows(get_host()):
        names = row["name"].split(" + ")
        if all(n in SWITCH for n in names):
            for cell in CELLS:
                yield pytest.param(names, cell, row["cells"][cell]["works"], id=f"{row['name']}-{cell}")


@pytest.mark.parametrize("names, cell, works", list(setups()))
def test_every_unsupported_cell_is_refused_before_loading(names, cell, works, monkeypatch):
    """The host's check, with what a run in that cell has: WORLD_SIZE (DDP), a DeepSpeed config, load_in_4bit.
    Nothing is loaded: it runs on the arguments alone, as validation does before any model loads."""
    parallel = cell.split("+")[0]
    monkeypatch.setenv("WORLD_SIZE", "2" if parallel in ("ddp", "fsdp", "model_parallel") else "1")
    stage = {"zero2": 2, "zero3": 3}.get(parallel)
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": stage}} if stage else None,
                           fsdp=True if parallel == "fsdp" else None,
                           parallelism_config={"tp_size": 2} if parallel == "model_parallel" else None,
                           **{n: None for n in get_host().specs if n != BUILTIN})
    for name in names:
        setattr(args, name, SWITCH[name])
    model_args = SimpleNamespace(load_in_4bit=cell.endswith("4bit"))
    host = get_host()
    if works:
        host.check(args, run_setup(args, model_args=model_args))
    else:
        with pytest.raises(PluginConfigError, match="does not support|is tested in|not been tested together"):
            host.check(args, run_setup(args, model_args=model_args))
