"""``PluginTrainingArguments``: ``TrainingArguments`` plus every installed plugin's flags.

The class is built when this module is imported, from the plugins the host discovered, so anything
that takes a TrainingArguments dataclass (HfArgumentParser, YAML/JSON args, ``--help``) keeps working.
``arguments_class(base=SFTConfig)`` adds the same flags to a Trainer subclass's own arguments class (TRL's
trainers rebuild any other TrainingArguments as their config, which would drop or refuse the flags).
``PluginArgumentParser`` adds what HfArgumentParser lacks: one ``--help`` group per plugin, and an
error that suggests the closest valid key for an unknown or misspelled one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from transformers import HfArgumentParser, TrainingArguments

from .errors import ConfigError
from .manager import PluginHost, get_host

# Every class built by build_arguments_class, keyed by its plugin names (after "module:Class" of its base when
# that is not TrainingArguments), so that pickling and deepcopy (the Trainer saves its args with torch.save)
# come back to the same class.
_CLASSES: dict[tuple[str, ...], type] = {}


class _PluginArgumentsBase:
    """Put before a TrainingArguments dataclass (or a subclass such as TRL's SFTConfig) in the bases."""

    _plugin_fields: ClassVar[dict[str, tuple[str, ...]]] = {}
    _plugin_key: ClassVar[tuple[str, ...]] = ()
    _host: ClassVar[PluginHost | None] = None

    def __post_init__(self):
        # Our checks first: TrainingArguments.__post_init__ may build DeepSpeed configs and would
        # fail later and less clearly on a wrongly typed value.
        hints = get_type_hints(type(self))
        plugin_flags = {n for names in self._plugin_fields.values() for n in names}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in plugin_flags:
                setattr(self, f.name, check_value(f.name, hints[f.name], value))
            elif value is not None and _scalar(hints[f.name]) is not None:
                # TrainingArguments' own fields: only numbers and booleans, whose annotations are exact
                # (YAML reads 5e-5 as a string); transformers checks the rest itself.
                setattr(self, f.name, check_value(f.name, _scalar(hints[f.name]), value))
        super().__post_init__()

    def plugin_args(self, name: str) -> Any:
        """The plugin's own flags dataclass, filled from these arguments."""
        spec = self._host.specs.get(name)
        if spec is None or spec.arguments is None:
            raise KeyError(f"no installed plugin '{name}' with arguments")
        return spec.arguments(**{n: getattr(self, n) for n in self._plugin_fields[name]})

    def __reduce__(self):
        return (_rebuild_arguments, (self._plugin_key, dict(self.__dict__)))


def _rebuild_arguments(key: tuple[str, ...], state: dict) -> Any:
    cls = _CLASSES.get(key)
    if cls is None and key and ":" in key[0]:  # another base, unpickled in a fresh process
        import importlib

        module, _, name = key[0].partition(":")
        cls = arguments_class(base=getattr(importlib.import_module(module), name))
    cls = cls or PluginTrainingArguments
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def build_arguments_class(host: PluginHost, base: type = TrainingArguments) -> type:
    """``base`` (TrainingArguments or a subclass) + the flags of every plugin the host knows, as one dataclass."""
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise ConfigError(f"arguments_class: base must be TrainingArguments or a subclass of it, got {base!r}")
    taken = {f.name for f in dataclasses.fields(base)}
    new_fields, plugin_fields = [], {}
    for name, spec in sorted(host.specs.items()):
        if spec.arguments is None:
            continue
        hints = get_type_hints(spec.arguments)  # resolves string annotations of the plugin's module
        names = []
        for f in dataclasses.fields(spec.arguments):
            if f.name in taken:
                raise ConfigError(f"plugin '{name}' flag '{f.name}' is already defined by another plugin"
                                  + ("" if base is TrainingArguments else f" or by {base.__name__}"))
            taken.add(f.name)
            copy = dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=dict(f.metadata)
            )
            new_fields.append((f.name, hints[f.name], copy))
            names.append(f.name)
        plugin_fields[name] = tuple(names)
    key = tuple(sorted(plugin_fields))
    if base is not TrainingArguments:
        key = (f"{base.__module__}:{base.__qualname__}", *key)
    cls = dataclasses.make_dataclass(
        "PluginTrainingArguments" if base is TrainingArguments else f"Plugin{base.__name__}",
        new_fields,
        bases=(_PluginArgumentsBase, base),
        namespace={"_plugin_fields": plugin_fields, "_plugin_key": key, "_host": host, "__module__": __name__},
    )
    cls.__doc__ = f"{base.__name__} plus the flags of the installed plugins: " + (", ".join(plugin_fields) or "none")
    _CLASSES[key] = cls
    return cls


# -- value checks -----------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}
_UNCHECKED = object()


def check_value(name: str, hint: Any, value: Any) -> Any:
    """Return ``value`` converted to ``hint`` (strings from YAML/CLI become numbers/bools), or raise
    ConfigError naming the key. Types we do not understand are passed through unchanged."""
    result = _convert(hint, value)
    if result is _UNCHECKED:
        return value
    if isinstance(result, _Rejected):
        raise ConfigError(f"'{name}': {result.why}")
    return result


class _Rejected:
    def __init__(self, why: str):
        self.why = why


def _convert(hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if hint is Any or hint is typing.Any:
        return _UNCHECKED
    if origin in (Union, types.UnionType):
        members = get_args(hint)
        if value is None:
            return None if type(None) in members else _Rejected(f"must not be empty, expected {_describe(hint)}")
        outcomes = [_convert(m, value) for m in members if m is not type(None)]
        for r in outcomes:  # an exact type match first: "5" stays a str in Union[str, int]
            if r is not _UNCHECKED and not isinstance(r, _Rejected) and type(r) is type(value):
                return r
        for r in outcomes:
            if r is _UNCHECKED:
                return _UNCHECKED
            if not isinstance(r, _Rejected):
                return r
        return _Rejected(f"expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value in choices:
            return value
        for c in choices:  # other cases ("Off"), numbers YAML read as numbers, False from a Python dict
            if str(c).lower() == str(value).lower() or (c == "off" and value is False):
                return c
        return _Rejected(f"must be one of {list(choices)}, got {value!r}")
    if origin in (list, tuple, set):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple, set)):
            return _Rejected(f"expected a list, got {value!r}")
        (item,) = get_args(hint)[:1] or (Any,)
        items = [_convert(item, v) for v in value]
        bad = [r for r in items if isinstance(r, _Rejected)]
        if bad:
            return bad[0]
        return [v if r is _UNCHECKED else r for v, r in zip(value, items)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        return _Rejected(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        return _Rejected(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int is a valid float; keep it (some fields read ints as step counts)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 5e-5 (no dot) as a string
            except ValueError:
                pass
        return _Rejected(f"expected a number, got {value!r}")
    if hint is str:
        return value if isinstance(value, str) else _Rejected(f"expected a string, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            return _Rejected(f"must be one of {[e.value for e in hint]}, got {value!r}")
    if hint is dict or origin is dict:
        return value if isinstance(value, dict) else _Rejected(f"expected a mapping, got {value!r}")
    return _UNCHECKED


def check_dataclass(obj: Any) -> None:
    """check_value on every field of a plain dataclass instance, converting in place."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            setattr(obj, f.name, check_value(f.name, hints[f.name], getattr(obj, f.name)))


def _scalar(hint: Any) -> Any:
    """int, float or bool if ``hint`` is one of them or Optional of one, else None."""
    members = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) else [hint]
    return members[0] if len(members) == 1 and members[0] in (int, float, bool) else None


def _describe(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in get_args(hint) if a is not type(None)]
    return " or ".join(names) or str(hint)


# -- the parser ---------------------------------------------------------------------------------------
class PluginArgumentParser(HfArgumentParser):
    """HfArgumentParser with a --help group per plugin and helpful unknown-key errors."""

    def _add_dataclass_arguments(self, dtype):
        plugin_fields = getattr(dtype, "_plugin_fields", None)
        if not plugin_fields:
            return super()._add_dataclass_arguments(dtype)
        host = dtype._host
        hints = get_type_hints(dtype)
        training = self.add_argument_group("training arguments (transformers.TrainingArguments)")
        groups = {}
        for name, names in plugin_fields.items():
            spec = host.specs.get(name)
            title = f"plugin {name} {host.versions.get(name, '')}".rstrip()
            group = self.add_argument_group(title, spec.description if spec else None)
            groups.update(dict.fromkeys(names, group))
        for f in dataclasses.fields(dtype):
            if f.init:
                f.type = hints[f.name]
                self._parse_dataclass_field(groups.get(f.name, training), f)

    def valid_keys(self) -> list[str]:
        return [f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init]

    def check_keys(self, keys) -> None:
        """ConfigError for keys no dataclass knows, with the closest valid key."""
        valid = self.valid_keys()
        unknown = [k for k in keys if k not in valid]
        if unknown:
            host = next((d._host for d in self.dataclass_types if getattr(d, "_host", None)), None) or get_host()
            raise ConfigError("; ".join(unknown_key_message(k, valid, host) for k in unknown))

    def parse_dict(self, args: dict[str, Any], allow_extra_keys: bool = False):
        if not allow_extra_keys:
            self.check_keys(args)
        return super().parse_dict(args, allow_extra_keys=allow_extra_keys)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        *outputs, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            self.check_keys([r.lstrip("-").split("=")[0] for r in remaining if r.startswith("--")])
            raise ConfigError(f"unexpected command-line values: {remaining}")
        return tuple(outputs)


def unknown_key_message(key: str, valid: list[str], host: PluginHost) -> str:
    msg = f"unknown key '{key}'"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    if close:
        return msg + f"; did you mean '{close[0]}'?"
    prefix = key.split("_")[0]
    if prefix in host.failed:
        return msg + f": plugin '{prefix}' is installed but not usable ({host.failed[prefix]})"
    if prefix in host.blocked:
        return msg + f": plugin '{prefix}' is {host.blocked[prefix]}"
    installed = ", ".join(sorted(n for n in host.specs if n != "host")) or "none"
    return msg + f"; no installed plugin provides it (installed plugins: {installed}; see `trainer-plugins list`)"


def arguments_class(host: PluginHost | None = None, base: type = TrainingArguments) -> type:
    """The PluginTrainingArguments class of ``host`` (the process-wide one by default); with ``base``, that
    TrainingArguments subclass plus the plugins' flags, for a Trainer subclass that wants its own arguments
    class (``arguments_class(base=SFTConfig)`` for ``class MySFT(PluginsMixin, SFTTrainer)``)."""
    host = host or get_host()
    if not hasattr(host, "_arguments_classes"):
        host._arguments_classes = {}
    if base not in host._arguments_classes:
        host._arguments_classes[base] = build_arguments_class(host, base)
    return host._arguments_classes[base]


PluginTrainingArguments = arguments_class()
