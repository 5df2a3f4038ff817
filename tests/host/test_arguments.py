import copy
import json
import pickle

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

from trainer_plugins import ConfigError
from trainer_plugins.arguments import PluginArgumentParser, arguments_class, check_value
from trainer_plugins.recipes import load_recipe, translate_renamed_keys


@pytest.fixture
def Args(probe_host):
    return arguments_class(probe_host)


def test_plugin_flags_are_fields_of_training_arguments(Args, tmp_path):
    args = Args(output_dir=str(tmp_path), probe=True, probe_scale=2.5, learning_rate=1e-3)
    assert isinstance(args, TrainingArguments)
    assert (args.probe, args.probe_scale, args.learning_rate) == (True, 2.5, 1e-3)
    assert args.plugin_args("probe").probe_scale == 2.5
    d = args.to_dict()
    assert d["probe_scale"] == 2.5 and d["probe_mode"] == "plain"
    assert json.loads(args.to_json_string())["probe"] is True


def test_plain_hf_argument_parser_reads_plugin_flags(Args, tmp_path):
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--probe", "--probe_scale", "3", "--probe_mode", "sgd"]
    )
    assert (args.probe, args.probe_scale, args.probe_mode) == (True, 3.0, "sgd")


def test_yaml_json_and_dict(Args, tmp_path):
    cfg = {"output_dir": str(tmp_path), "probe": True, "probe_scale": 0.5, "learning_rate": "5e-5"}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    p = PluginArgumentParser(Args)
    for (args,) in (p.parse_yaml_file(tmp_path / "a.yaml"), p.parse_json_file(tmp_path / "a.json"), p.parse_dict(cfg)):
        assert args.probe_scale == 0.5
        assert args.learning_rate == 5e-5  # YAML reads 5e-5 as a string; converted


def test_help_shows_a_group_per_plugin(Args):
    text = PluginArgumentParser(Args).format_help()
    assert "plugin probe" in text and "records hook calls" in text
    assert text.index("training arguments") < text.index("plugin probe")  # plugin groups come last
    probe_group = text.split("plugin probe")[1]
    assert "--probe_scale" in probe_group and "--learning_rate" not in probe_group


def test_unknown_key_suggests_the_closest(Args):
    with pytest.raises(ConfigError, match="unknown key 'probe_scal'; did you mean 'probe_scale'"):
        PluginArgumentParser(Args).parse_dict({"probe_scal": 2})
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        PluginArgumentParser(Args).parse_args_into_dataclasses(["--learnin_rate", "1"])


def test_unknown_plugin_key_names_the_installed_plugins(Args):
    with pytest.raises(ConfigError, match=r"unknown key 'sparsity_target'.*installed plugins: probe"):
        PluginArgumentParser(Args).parse_dict({"sparsity_target": 0.5})


def test_wrong_types_and_choices_are_errors(Args):
    with pytest.raises(ConfigError, match="'probe_scale': expected a number, got 'big'"):
        Args(probe_scale="big")
    with pytest.raises(ConfigError, match=r"'probe_mode': must be one of \['plain', 'sgd'\], got 'adam'"):
        Args(probe_mode="adam")
    with pytest.raises(ConfigError, match="'probe': expected true or false"):
        Args(probe="maybe")
    with pytest.raises(ConfigError, match="'max_steps': expected an integer"):
        Args(max_steps="ten")


def test_check_value_conversions():
    from typing import Literal, Optional

    assert check_value("x", int, "7") == 7
    assert check_value("x", float, 3) == 3
    assert check_value("x", Optional[int], None) is None
    assert check_value("x", bool, "true") is True
    assert check_value("x", list[int], ["1", 2]) == [1, 2]
    assert check_value("x", Literal["off", "mini"], False) == "off"  # YAML `off` is a boolean
    assert check_value("x", Optional[str], "5") == "5"


def test_pickle_and_deepcopy_keep_the_class(Args, tmp_path):
    args = Args(output_dir=str(tmp_path), probe=True)
    for clone in (pickle.loads(pickle.dumps(args)), copy.deepcopy(args)):
        assert type(clone) is Args and clone.probe is True and clone.output_dir == str(tmp_path)


def test_default_class_has_the_installed_plugins():
    from trainer_plugins import PluginTrainingArguments, get_host

    flags = {n for names in PluginTrainingArguments._plugin_fields.values() for n in names}
    for name, spec in get_host().specs.items():
        assert set(spec.flag_names()) <= flags


@pytest.mark.parametrize("valid", [["gradient_checkpointing", "gradient_checkpointing_kwargs"],  # transformers 5.17
                                   ["gradient_checkpointing", "activation_checkpointing"]])  # later: both names
def test_renamed_training_keys_work_with_either_name(valid):
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        expected = name if name in valid else "gradient_checkpointing"
        assert translate_renamed_keys({name: True, "learning_rate": 1e-4}, valid) == {expected: True,
                                                                                      "learning_rate": 1e-4}
    if "activation_checkpointing" not in valid:
        with pytest.raises(ConfigError, match="same setting"):
            translate_renamed_keys({"activation_checkpointing": True, "gradient_checkpointing": True}, valid)


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_recipe_with_either_checkpointing_name_loads(name, tmp_path):
    recipe = load_recipe({"model": {"model_name_or_path": "x"}, "train": {"output_dir": str(tmp_path), name: True}},
                         load_config=False)
    assert recipe.args.gradient_checkpointing or getattr(recipe.args, "activation_checkpointing", False)
