import json
import subprocess
import sys

from trainer_plugins.cli import main


def test_list_json_shows_each_plugin(capsys):
    assert main(["list", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    host = next(p for p in info if p["name"] == "host")
    assert host["status"] == "ok" and "load_model" in host["hooks"] and host["switch"] is None
    for p in info:
        if p["status"] == "ok" and p["name"] != "host":
            assert p["switch"] == p["name"] and any(f["name"] == p["name"] for f in p["flags"])


def test_list_text(capsys):
    assert main(["list"]) == 0
    assert "host" in capsys.readouterr().out


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "GPU:", "plugins:"):
        assert name in out


def test_plugin_command_from_register_commands(capsys, install_plugin):
    install_plugin("alpha", '''
from dataclasses import dataclass
from trainer_plugins import PluginSpec, hookimpl
@dataclass
class A:
    alpha: bool = False
@hookimpl
def plugin_spec():
    return PluginSpec(name="alpha", arguments=A)
@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("alpha-count", help="count")
    p.add_argument("n", type=int)
    p.set_defaults(func=lambda ns: print("counted", ns.n) or 0)
''')
    assert main(["alpha-count", "3"]) == 0
    assert "counted 3" in capsys.readouterr().out


def test_dry_run_loads_no_weights(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import trainer_plugins.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  model_name_or_path: {tiny_model_dir}\ntrain:\n  output_dir: {tmp_path}\n")
    assert main(["train", str(recipe), "--dry-run", "--learning_rate", "3e-4"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "learning_rate: 0.0003" in out and "LlamaConfig" in out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "trainer_plugins", "list", "--json"], capture_output=True, text=True,
                         check=True).stdout
    assert any(p["name"] == "host" for p in json.loads(out))
