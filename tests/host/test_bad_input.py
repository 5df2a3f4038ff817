"""Each bad input gives one clear error (exit code 2, message on stderr) before any model is loaded."""

import textwrap

import pytest
import yaml

from trainer_plugins.cli import main

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass, field
    from trainer_plugins import ConfigError, PluginSpec, hookimpl

    @dataclass
    class Args:
        {name}: bool = False
        {name}_rate: float = 1.0

    @hookimpl
    def plugin_spec():
        return PluginSpec(name="{name}", arguments=Args, {extra})

    @hookimpl
    def validate(args):
        if args.{name}_rate <= 0:
            raise ConfigError("{name}_rate must be > 0, got %s" % args.{name}_rate)
''')


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load weights."""
    import transformers

    import trainer_plugins.models as models

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    def write(extra=None, text=None, **sections):
        base = {"model": {"model_name_or_path": tiny_model_dir},
                "data": {"dataset": "stdlib", "max_train_samples": 8},
                "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": []}}
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        base.update(extra or {})
        path = tmp_path / "recipe.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(base))
        return str(path)

    return write


def fails(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("trainer-plugins: error:") == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_key_suggests(recipe, capsys):
    fails(capsys, ["train", recipe(train={"learnig_rate": 1e-4})], "unknown key 'learnig_rate'; did you mean 'learning_rate'?")


def test_unknown_cli_override(recipe, capsys):
    fails(capsys, ["train", recipe(), "--max_step", "3"], "unknown key 'max_step'; did you mean 'max_steps'?")


def test_wrong_type(recipe, capsys):
    fails(capsys, ["train", recipe(train={"max_steps": "ten"})], "'max_steps': expected an integer, got 'ten'")


def test_bad_choice(recipe, capsys):
    fails(capsys, ["train", recipe(model={"dtype": "float64"})], "dtype", "float64")


def test_plugin_not_installed(recipe, capsys):
    fails(capsys, ["train", recipe(train={"sparsity": True})], "unknown key 'sparsity'", "no installed plugin provides it")


def test_transformers_rejects_a_value(recipe, capsys):
    fails(capsys, ["train", recipe(train={"optim": "my_custom_opt"})], "my_custom_opt")


def test_malformed_yaml(recipe, capsys):
    fails(capsys, ["train", recipe(text="model: [unclosed\n")], "is not valid YAML")


def test_recipe_not_a_mapping(recipe, capsys):
    fails(capsys, ["train", recipe(text="- a\n- b\n")], "must be a mapping of keys, got list")


def test_section_not_a_mapping(recipe, capsys):
    fails(capsys, ["train", recipe(text="model: 5\n")], "section 'model' must be a mapping, got int")


def test_key_given_twice(recipe, capsys):
    fails(capsys, ["train", recipe(extra={"max_steps": 3})], "key 'max_steps' is given twice")


def test_missing_recipe(tmp_path, capsys):
    fails(capsys, ["train", str(tmp_path / "nope.yaml")], "recipe not found")


def test_missing_model_path(recipe, capsys, tmp_path):
    fails(capsys, ["train", recipe(model={"model_name_or_path": str(tmp_path / "no" / "such" / "model")})],
          "no/such/model")


def test_missing_dataset_file(recipe, capsys, tmp_path):
    fails(capsys, ["train", recipe(data={"dataset": str(tmp_path / "missing.jsonl")})], "missing.jsonl")


def test_bad_eval_fraction(recipe, capsys):
    fails(capsys, ["train", recipe(data={"eval_fraction": 1.5})], "eval_fraction")


def test_random_init_with_4bit(recipe, capsys):
    fails(capsys, ["train", recipe(model={"model_init": "random", "load_in_4bit": True})], "load_in_4bit")


def test_missing_deepspeed_config(recipe, capsys, tmp_path, deepspeed_env):
    fails(capsys, ["train", recipe(train={"deepspeed": str(tmp_path / "ds.json")})], "ds.json")


def test_bad_override_syntax(recipe, capsys):
    fails(capsys, ["train", recipe(), "max_steps", "3"], "expected --key value, got 'max_steps'")


def test_conflicting_plugins(recipe, capsys, install_plugin):
    install_plugin("alpha", PLUGIN.format(name="alpha", extra='conflicts={"beta": "both own the optimizer"}'))
    install_plugin("beta", PLUGIN.format(name="beta", extra=""))
    fails(capsys, ["train", recipe(train={"alpha": True, "beta": True})],
          "plugin 'alpha': cannot be enabled together with 'beta': both own the optimizer")


def test_plugin_validate_rejects(recipe, capsys, install_plugin):
    install_plugin("alpha", PLUGIN.format(name="alpha", extra=""))
    fails(capsys, ["train", recipe(train={"alpha": True, "alpha_rate": -2})],
          "plugin 'alpha' (hook validate): alpha_rate must be > 0, got -2")


def test_plugin_missing_dependency(recipe, capsys, install_plugin):
    install_plugin("alpha", PLUGIN.format(name="alpha", extra='requires={"no_such_pkg_q": "no-such-pkg-q>=2"}'))
    fails(capsys, ["train", recipe(train={"alpha": True})], "needs the package 'no_such_pkg_q'",
          "pip install 'no-such-pkg-q>=2'")


def test_plugin_unsupported_setup(recipe, capsys, install_plugin, deepspeed_env):
    install_plugin("alpha", PLUGIN.format(name="alpha", extra='supports=frozenset({"ddp"})'))
    fails(capsys, ["train", recipe(train={"alpha": True, "deepspeed": "recipes/deepspeed/zero3.json"})],
          "plugin 'alpha': does not support DeepSpeed ZeRO-3")


@pytest.mark.parametrize("how", ["flag", "accelerate"])
def test_fsdp_is_told_apart_from_ddp(recipe, capsys, monkeypatch, how):
    """FSDP launches several processes like DDP, but hands the plugins sharded parameters: a plugin that
    is tested only with DDP and ZeRO is refused under FSDP, as '--fsdp' or as an accelerate FSDP launch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", recipe(train={"apollo": "mini"})]
    if how == "flag":
        argv += ["--fsdp", "full_shard"]
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fails(capsys, argv, "plugin 'apollo': does not support FSDP (PyTorch Fully Sharded Data Parallel) (it works "
                        "with: a single process, DDP (several processes without DeepSpeed), DeepSpeed ZeRO-1/2")


@pytest.mark.parametrize("how", ["recipe", "accelerate"])
def test_tensor_context_and_sequence_parallelism_are_refused(recipe, capsys, monkeypatch, how):
    """accelerate's N-D parallelism splits weights (tp) or sequences (cp, sp) across processes: no plugin is
    written for that, so it is a cell of its own, refused for every plugin, whether the recipe asks for it
    (parallelism_config) or an ``accelerate launch`` config does."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = {"lst": True}
    if how == "recipe":
        train["parallelism_config"] = {"tp_size": 2}
    else:
        monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
        monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    fails(capsys, ["train", recipe(train=train)], "plugin 'lst': does not support tensor, context or sequence "
                                                  "parallelism (accelerate's ParallelismConfig) (it works with: a single process")


def test_data_sharding_alone_counts_as_fsdp(recipe, capsys, monkeypatch):
    """dp_shard without tp/cp/sp is FSDP2 underneath: the FSDP cell's refusal, not DDP's acceptance."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails(capsys, ["train", recipe(train={"apollo": "mini", "parallelism_config": {"dp_shard_size": 2}})],
          "plugin 'apollo': does not support FSDP (PyTorch Fully Sharded Data Parallel)")


def test_a_recipes_parallelism_mapping_becomes_accelerates_object(recipe):
    """Without a plugin the run is the Trainer's own, which hands accelerate a ParallelismConfig, not a dict."""
    from accelerate import ParallelismConfig

    from trainer_plugins.recipes import load_recipe

    loaded = load_recipe(recipe(train={"parallelism_config": {"tp_size": 2}}), load_config=False)
    assert isinstance(loaded.args.parallelism_config, ParallelismConfig)
    assert loaded.args.parallelism_config.tp_size == 2


def test_estimate_refuses_fsdp(recipe, capsys):
    fails(capsys, ["estimate", recipe(), "--fsdp", "full_shard"], "estimate models one process, DDP and DeepSpeed "
          "ZeRO-1/2/3, not FSDP")


def test_estimate_refuses_tensor_parallelism(recipe, capsys):
    fails(capsys, ["estimate", recipe(train={"parallelism_config": {"tp_size": 4}})],
          "estimate models one process, DDP and DeepSpeed ZeRO-1/2/3, not tensor, context or sequence parallelism "
          "(tp_size 4)")


def test_disabled_plugin_flag(recipe, capsys, install_plugin, monkeypatch):
    install_plugin("alpha", PLUGIN.format(name="alpha", extra=""))
    monkeypatch.setenv("TRAINER_PLUGINS_DISABLE", "alpha")
    fails(capsys, ["train", recipe(train={"alpha": True})], "plugin 'alpha' is disabled by TRAINER_PLUGINS_DISABLE")


def test_broken_plugin_enabled(recipe, capsys, install_plugin):
    install_plugin("alpha", "raise RuntimeError('boom at import')\n")
    with pytest.warns(UserWarning, match="plugin 'alpha' is not usable"):
        fails(capsys, ["train", recipe(train={"alpha": True})],
              "plugin 'alpha' is installed but not usable (failed to import tp_alpha: RuntimeError: boom at import)")


def test_yaml_reads_only_true_and_false_as_booleans(tmp_path, tiny_model_dir):
    """`no`, `off`, `yes`, `on` stay words (YAML 1.2), so `eval_strategy: no` means the strategy, not False;
    boolean flags still take them."""
    from trainer_plugins.recipes import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{model_name_or_path: {tiny_model_dir}}}
        data: {{dataset: stdlib, max_train_samples: 8}}
        train: {{output_dir: {tmp_path / "out"}, max_steps: 1, report_to: [], eval_strategy: no, use_cpu: yes,
                 disable_tqdm: on, remove_unused_columns: off}}
    """))
    args = load_recipe(str(path), ["--save_strategy", "no", "--logging_strategy=no", "--seed", "7"]).args
    assert (args.eval_strategy, args.save_strategy, args.logging_strategy) == ("no", "no", "no")
    assert args.use_cpu is True and args.disable_tqdm is True and args.remove_unused_columns is False
    assert args.seed == 7
