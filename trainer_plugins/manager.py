"""Plugin discovery, enabling, ordering, conflicts and hook calls.

One ``PluginHost`` wraps one ``pluggy.PluginManager``. Plugins come from the entry-point group
``trainer_plugins``; the host's built-in plugin is registered like any other. The host never imports
a plugin by name.

Environment:
    TRAINER_PLUGINS_DISABLE=a,b   do not load these plugins
    TRAINER_PLUGINS_ONLY=a,b      load only these plugins (the built-in one is always loaded)
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginConfigError, PluginError
from .spec import CELLS, PluginSpec, cell_label, cell_of, is_switched_on, supported_cells

ENTRY_POINT_GROUP = "trainer_plugins"
DISABLE_ENV = "TRAINER_PLUGINS_DISABLE"
ONLY_ENV = "TRAINER_PLUGINS_ONLY"
BUILTIN = "host"

# Hooks called on every installed plugin; all others only on enabled ones.
_ALWAYS_CALLED = {"plugin_spec", "register_commands", "benchmark_methods"}


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class PluginHost:
    """The installed plugins, their specs, and hook calls restricted to the enabled ones."""

    def __init__(self, load_entrypoints: bool = True, plugins: Iterable[tuple[str, Any]] = ()):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.specs: dict[str, PluginSpec] = {}
        self.versions: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # name -> why it is not usable
        self.blocked: dict[str, str] = {}  # name -> why it was not loaded
        from . import builtin

        self.register(builtin, BUILTIN, version=_version("trainer-plugins"))
        if load_entrypoints:
            self._load_entrypoints()
        for name, plugin in plugins:
            self.register(plugin, name)

    # -- discovery ---------------------------------------------------------------------------
    def _load_entrypoints(self) -> None:
        disabled, only = _env_list(DISABLE_ENV) or set(), _env_list(ONLY_ENV)
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.specs or ep.name in self.failed:
                continue  # the same distribution seen twice on sys.path
            if ep.name in disabled:
                self.blocked[ep.name] = f"disabled by {DISABLE_ENV}"
                continue
            if only is not None and ep.name not in only:
                self.blocked[ep.name] = f"not in {ONLY_ENV}"
                continue
            version = ep.dist.version if ep.dist else None
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the host down
                self._fail(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}", version)
                continue
            self.register(plugin, ep.name, version=version)

    def register(self, plugin: Any, name: str, version: str | None = None) -> PluginSpec | None:
        """Register a plugin object/module under ``name``; returns its spec (None if it is broken)."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(name, f"invalid hooks: {exc}", version)
            return None
        wrappers = [
            impl.function.__name__
            for hook in self.pm.get_hookcallers(plugin) or []
            for impl in hook.get_hookimpls()
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
        ]
        specs = [r for r in self._call_impls("plugin_spec", {}, only=[name]) if r is not None]
        problems = []
        if wrappers:
            problems.append(f"hook wrappers are not supported ({', '.join(wrappers)})")
        if len(specs) != 1 or not isinstance(specs[0], PluginSpec):
            problems.append("its plugin_spec hook must return one trainer_plugins.PluginSpec")
        else:
            spec = specs[0]
            if spec.name != name:
                problems.append(f"its spec is named {spec.name!r} but the entry point is {name!r}")
            problems += spec.problems()
        if problems:
            self.pm.unregister(plugin)
            self._fail(name, "; ".join(problems), version)
            return None
        self.specs[name] = specs[0]
        self.versions[name] = version or getattr(plugin, "__version__", None) or "unknown"
        return specs[0]

    def _fail(self, name: str, why: str, version: str | None) -> None:
        self.failed[name] = why
        self.versions.setdefault(name, version or "unknown")
        warnings.warn(f"trainer-plugins: plugin '{name}' is not usable: {why}", stacklevel=3)

    # -- enabling and checks -------------------------------------------------------------------
    def enabled(self, args: Any) -> list[str]:
        """Names of the enabled plugins, in hook order (declared run_after, then name; built-in last)."""
        on = [
            n for n, s in self.specs.items()
            if n != BUILTIN and (s.always_on or is_switched_on(getattr(args, n, None)))
        ]
        return _topological(on, self.specs) + [BUILTIN]

    def check(self, args: Any, setup: set[str]) -> None:
        """Declared requirements, conflicts and capabilities of the enabled plugins. Raises ConfigError."""
        enabled = [n for n in self.enabled(args) if n != BUILTIN]
        for name in enabled:
            spec = self.specs[name]
            for module, requirement in spec.requires.items():
                if not importable(module):
                    raise PluginConfigError(
                        name, f"needs the package '{module}', which is not installed: pip install '{requirement}'"
                    )
            for other, why in spec.conflicts.items():
                if other in enabled:
                    raise PluginConfigError(name, f"cannot be enabled together with '{other}': {why}")
            cell, works = cell_of(setup), supported_cells(spec)
            if cell not in works:
                raise PluginConfigError(
                    name, f"does not support {cell_label(cell)} (it works with: "
                          f"{', '.join(cell_label(c) for c in CELLS if c in works)})")
        self._check_pairs(enabled, cell_of(setup))

    def check_model(self, args: Any, model: Any = None, peft_config: Any = None) -> None:
        """A plugin that builds its trainable part itself (``PluginSpec.plain_model``) refuses a model already
        wrapped by peft (a PeftModel, or adapters loaded through transformers' ``load_adapter``) and a trainer's
        own ``peft_config`` (TRL), which would wrap the model again around the plugin's. Raises ConfigError."""
        wrapped = bool(getattr(model, "peft_config", None))  # PeftModel, or adapters loaded into the model
        if not (wrapped or peft_config is not None):
            return
        what = "a model already wrapped by peft" if wrapped else "the trainer's peft_config"
        fix = ("pass the plain transformers model (load it again if an earlier trainer prepared this one: it was "
               "changed in place)") if wrapped else "drop peft_config"
        for name in self.enabled(args):
            why = self.specs[name].plain_model
            if why:
                raise PluginConfigError(name, f"cannot train {what}: {why}; {fix}")

    def _check_pairs(self, enabled: list[str], cell: str) -> None:
        """Two plugins enabled together must be declared tested together (``works_with``) in this cell."""
        for i, a in enumerate(enabled):
            for b in enabled[i + 1:]:
                cells = self.pair_cells(a, b)
                if cells is None:
                    tested = [f"{x}+{y}" for x, y in self.pairs()] or ["none"]
                    raise PluginConfigError(a, f"has not been tested together with '{b}'; enable one of them (pairs "
                                               f"tested together: {', '.join(tested)})")
                if cell not in cells:
                    raise PluginConfigError(a, f"with '{b}' is tested in {', '.join(cell_label(c) for c in CELLS if c in cells)}"
                                               f", not in {cell_label(cell)}")

    def pair_cells(self, a: str, b: str):
        """The cells where plugins ``a`` and ``b`` are declared tested together (either side), or None."""
        declared = [self.specs[x].works_with.get(y) for x, y in ((a, b), (b, a)) if x in self.specs]
        declared = [set(c) for c in declared if c is not None]
        return set().union(*declared) if declared else None

    def pairs(self) -> list[tuple[str, str]]:
        """The declared pairs among the installed plugins, sorted."""
        out = set()
        for name, spec in self.specs.items():
            for other in spec.works_with:
                if other in self.specs:
                    out.add(tuple(sorted((name, other))))
        return sorted(out)

    # -- hook calls ----------------------------------------------------------------------------
    def call(self, hook: str, args: Any = None, **kwargs: Any) -> list[Any]:
        """Call ``hook`` on the enabled plugins in order; returns the non-None results."""
        only = None if hook in _ALWAYS_CALLED else self.enabled(args)
        if "args" in _spec_argnames(self.pm, hook):
            kwargs["args"] = args
        return [r for r in self._call_impls(hook, kwargs, only=only) if r is not None]

    def call_first(self, hook: str, args: Any = None, **kwargs: Any) -> Any:
        """Firstresult hooks: the first non-None result in plugin order, or None."""
        only = self.enabled(args)
        if "args" in _spec_argnames(self.pm, hook):
            kwargs["args"] = args
        for result in self._call_impls(hook, kwargs, only=only, stop_at_first=True):
            if result is not None:
                return result
        return None

    def pipe(self, hook: str, args: Any, key: str, value: Any, **kwargs: Any) -> Any:
        """Chained hooks (prepare_model): each enabled plugin gets the previous plugin's result as
        ``key``; a None result keeps the value."""
        kwargs.update({key: value, "args": args})
        # _call_impls reads kwargs at each call, so updating it between yields chains the results.
        for result in self._call_impls(hook, kwargs, only=self.enabled(args)):
            if result is not None:
                kwargs[key] = result
        return kwargs[key]

    def _call_impls(self, hook: str, kwargs: dict, only: list[str] | None, stop_at_first=False):
        # We iterate the implementations ourselves rather than through pluggy's caller so that an
        # error names the plugin that raised it and the order is the declared one, not LIFO.
        impls = {impl.plugin_name: impl for impl in getattr(self.pm.hook, hook).get_hookimpls()}
        order = only if only is not None else sorted(impls, key=lambda n: (n == BUILTIN, n))
        for name in order:
            impl = impls.get(name)
            if impl is None:
                continue
            try:
                result = impl.function(**{a: kwargs[a] for a in impl.argnames})
            except PluginError:
                raise
            except ConfigError as exc:
                raise PluginConfigError(name, str(exc), hook) from exc
            except Exception as exc:
                raise PluginError(name, f"{type(exc).__name__}: {exc}", hook) from exc
            yield result
            if stop_at_first and result is not None:
                return

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or []) if plugin else []


def _spec_argnames(pm: pluggy.PluginManager, hook: str) -> tuple[str, ...]:
    return getattr(pm.hook, hook).spec.argnames


def _topological(names: list[str], specs: dict[str, PluginSpec]) -> list[str]:
    """Order names so each comes after the enabled plugins it declares in run_after; ties by name."""
    done: list[str] = []
    pending = sorted(names)
    while pending:
        ready = [n for n in pending if all(d in done or d not in names for d in specs[n].run_after)]
        if not ready:
            raise ConfigError(f"plugins {pending} declare a run_after cycle; they cannot be ordered")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def get_host() -> PluginHost:
    """The process-wide host, built on first use from the installed entry points."""
    return PluginHost()
