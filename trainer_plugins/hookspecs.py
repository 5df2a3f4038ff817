"""Every hook a trainer-plugins plugin can implement. The docstring of each is its contract.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match these specs; it
is found through the entry-point group ``trainer_plugins``. Implementations may accept any subset of
the arguments, by name.

Order of a training run::

    plugin_spec                      at discovery: who the plugin is, its flags, what it needs
    register_commands                when the CLI starts
    benchmark_methods                when `trainer-plugins bench` lists its methods (not in a training run)
    validate                         after the arguments are parsed, before any model is loaded
    load_model                       the recipe/CLI needs a model (first non-None result wins)
    estimate_model                   `trainer-plugins estimate` instead of load_model, on the meta device
    prepare_model                    before the Trainer is built (each enabled plugin in turn)
    callbacks                        when the Trainer is built
    metrics                          whenever the Trainer logs training metrics
    create_optimizer                 inside Trainer.create_optimizer, so DeepSpeed gets it too
    save_model                       whenever the Trainer writes model weights (checkpoints and final)
    export                           after the final save_model (not after checkpoints)

Only the plugins the user enabled (their switch flag is on) are called, except for ``plugin_spec``,
``register_commands`` and ``benchmark_methods``; the host enforces this, so an implementation need not check its switch.
Hooks run in the order the plugins declare (``PluginSpec.run_after``), then by name; the host's
built-in plugin runs last. An exception raised in a hook is re-raised as ``PluginError`` naming the
plugin and the hook.
"""

from __future__ import annotations

import pluggy

PROJECT = "trainer_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def plugin_spec():
    """Describe the plugin: return a ``trainer_plugins.PluginSpec``.

    It carries the plugin's name, its dataclass of flags (merged into ``PluginTrainingArguments``;
    every field name starts with the plugin's name, and the field named exactly like the plugin is
    its switch), the Python packages it needs, the plugins it conflicts with or must run after, and
    which parallel/quantised setups it supports. This is data: the host checks it before training,
    ``trainer-plugins list`` prints it, and no code of the host names a plugin.
    Called for every installed plugin, enabled or not.
    """


@hookspec
def register_commands(subparsers):
    """Add subcommands to the ``trainer-plugins`` CLI.

    ``subparsers`` is the ``argparse`` sub-parser action: call ``subparsers.add_parser(name, help=...)``
    and ``set_defaults(func=callable)``; the callable gets the parsed ``argparse.Namespace`` and
    returns an exit code. Names of built-in commands cannot be taken. Called for every installed
    plugin, enabled or not (a command must exist before any recipe is read).
    """


@hookspec
def benchmark_methods():
    """Training methods for ``trainer-plugins bench``: a dict ``name -> trainer_plugins.bench.BenchMethod``
    (a ``prepare(model) -> model`` and/or an ``optimizer(model, lr)``), run on the same random-weight
    Llama shapes as the baselines. Names must not collide with the baselines or other plugins' methods.
    Called for every installed plugin, enabled or not.
    """


@hookspec
def validate(args, model_args, model_config):
    """Reject a bad configuration before any weights are loaded.

    ``args`` is the parsed ``PluginTrainingArguments``; ``model_args`` the ``ModelArguments`` (None when
    the model came from Python); ``model_config`` the model's ``PretrainedConfig`` (loaded without
    weights; None if unknown). Raise ``trainer_plugins.ConfigError`` with a message that says what is
    wrong and what would work (bad values, unsupported architecture, incompatible options). The host
    has already checked the declared requirements, conflicts and capabilities of ``PluginSpec``.
    Return value ignored. Keep it cheap: it also runs when the Trainer is built.
    """


@hookspec(firstresult=True)
def load_model(args, model_args):
    """Load the model instead of the default loader, or return None.

    For plugins that must shape the model while loading it (a pruned base, a quantised backbone).
    The first non-None result wins; the host's default loader (HF directory, hub name, GGUF, 4-bit)
    runs last. Return a ``transformers.PreTrainedModel`` (or a ``torch.nn.Module`` that behaves like one).
    """


@hookspec(firstresult=True)
def estimate_model(model, args, model_args):
    """For ``trainer-plugins estimate`` (memory without weights): shape a meta-device model as your
    ``load_model`` would, or return None if your ``load_model`` does not change what memory depends on.

    ``model`` is what the default loader builds, on the meta device (shapes and dtypes, no values), before
    4-bit quantisation. Return it pruned / quantised as ``load_model`` would return it (same shapes and
    dtypes; values do not exist: pick units without reading them, as random scores would) and apply
    ``trainer_plugins.models.quantize_linears_4bit`` yourself when ``model_args.load_in_4bit``. Your
    ``prepare_model`` then runs on the result as in training, so it must accept a meta-device model
    (skip initialisation that reads weights). The first non-None result wins.
    """


@hookspec
def prepare_model(model, args):
    """Wrap or convert the model before the Trainer is built; return the new model or None to keep it.

    Each enabled plugin gets the previous plugin's result, in declared order: attach adapters,
    build a side network, make layers reversible, install masks, freeze parameters.
    """


@hookspec
def callbacks(args, trainer):
    """Return a list of ``transformers.TrainerCallback`` to add to the Trainer (schedules, masks,
    logging). Callbacks see the model, optimizer and scheduler through the usual callback kwargs;
    ``trainer`` is the Trainer being built (its ``__init__`` has not finished: keep the reference and
    use it from the callback's events). Callbacks that hold state to resume should implement
    ``transformers.trainer_callback.ExportableState``.
    """


@hookspec
def metrics(trainer):
    """Return a dict of numbers to add to the training logs (TensorBoard, W&B, ``log_history``), or None.

    Called each time the Trainer logs training metrics (``logging_steps``), on every process; only
    the main process reports. Prefix keys with the plugin's name (``sparse/sparsity``).
    """


@hookspec(firstresult=True)
def create_optimizer(model, args, trainer):
    """Build the optimizer, or return None to leave it to the next plugin / the Trainer.

    Called from inside ``Trainer.create_optimizer``, which DeepSpeed's ``deepspeed_init`` also calls,
    so under ZeRO the engine wraps what you return. ``model`` is the model to optimise (its trainable
    parameters), ``trainer`` the Trainer (for ``get_decay_parameter_names``). Use ``args.learning_rate``,
    ``args.weight_decay``, ``args.adam_beta1/2`` and ``args.adam_epsilon`` unless the plugin's flags say
    otherwise. The state must resume exactly through ``state_dict``/``load_state_dict``.
    """


@hookspec(firstresult=True)
def save_model(trainer, output_dir, state_dict, checkpoint):
    """Write the model weights yourself, or return None to let the Trainer do it.

    Called where the Trainer writes weights (``Trainer._save``), on the process that saves.
    ``checkpoint`` is True inside ``checkpoint-N`` folders (what you write there must let training
    resume exactly) and False for the final ``save_model``. ``state_dict`` is the gathered state dict
    under DeepSpeed ZeRO-3, else None. Return True when you wrote the weights. Outputs must load in
    the ecosystem (safetensors, ``save_pretrained``, peft adapter format).
    """


@hookspec
def export(trainer, output_dir):
    """Write final artefacts next to the saved model (recovered adapters, merged weights, reports).

    Called at the end of ``trainer.save_model(output_dir)`` when ``output_dir`` is not a
    ``checkpoint-N`` folder, i.e. after the final save (the recipe runner saves once training ends).
    Runs on every process (ZeRO-3 needs all ranks to gather parameters); write files only where
    ``trainer.is_world_process_zero()``.
    """
