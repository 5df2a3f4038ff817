"""Discovery through real entry points: a plugin distribution is written to a temporary sys.path entry."""

import sys
import textwrap

import pytest

from trainer_plugins import ConfigError, PluginConfigError, PluginSpec
from trainer_plugins.manager import PluginHost
from trainer_plugins.spec import is_switched_on

PLUGIN = '''
from dataclasses import dataclass, field
from trainer_plugins import PluginSpec, hookimpl

@dataclass
class Args:
    {name}: bool = field(default=False, metadata={{"help": "switch"}})

@hookimpl
def plugin_spec():
    return PluginSpec(name="{name}", arguments=Args, {extra})
'''


def install(tmp_path, monkeypatch, name, body=None, extra="", version="1.2.3"):
    """A distribution `tp-{name}` with entry point `{name}` in group trainer_plugins."""
    (tmp_path / f"tp_{name}.py").write_text(body if body is not None else PLUGIN.format(name=name, extra=extra))
    info = tmp_path / f"tp_{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tp-{name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[trainer_plugins]\n{name} = tp_{name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(f"tp_{name}", None)


def test_entry_point_discovery_with_version(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "alpha")
    host = PluginHost()
    assert "alpha" in host.specs and host.versions["alpha"] == "1.2.3"
    assert host.hooks_of("alpha") == ["plugin_spec"]


def test_disable_and_only_lists(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "alpha")
    install(tmp_path, monkeypatch, "beta")
    monkeypatch.setenv("TRAINER_PLUGINS_DISABLE", "alpha")
    host = PluginHost()
    assert "alpha" not in host.specs and "beta" in host.specs
    assert host.blocked["alpha"] == "disabled by TRAINER_PLUGINS_DISABLE"
    monkeypatch.delenv("TRAINER_PLUGINS_DISABLE")
    monkeypatch.setenv("TRAINER_PLUGINS_ONLY", "alpha")
    host = PluginHost()
    assert "alpha" in host.specs and "beta" not in host.specs and "host" in host.specs


def test_broken_plugin_warns_and_is_reported(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "broken", body="import no_such_module_xyz\n")
    with pytest.warns(UserWarning, match="plugin 'broken' is not usable: failed to import tp_broken: ModuleNotFoundError"):
        host = PluginHost()
    assert "broken" in host.failed and "broken" not in host.specs


def test_enabling_a_broken_plugin_is_an_error_naming_it(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "broken", body="import no_such_module_xyz\n")
    with pytest.warns(UserWarning):
        host = PluginHost()
    from trainer_plugins.arguments import PluginArgumentParser, arguments_class

    with pytest.raises(ConfigError, match="plugin 'broken' is installed but not usable.*no_such_module_xyz"):
        PluginArgumentParser(arguments_class(host)).parse_dict({"broken": True})


@pytest.mark.parametrize("extra, problem", [
    ('supports=frozenset({"zero4"})', "unknown setups"),
    ('run_after=("x",), always_on=False', None),
])
def test_bad_specs_are_reported(tmp_path, monkeypatch, extra, problem):
    install(tmp_path, monkeypatch, "odd", extra=extra)
    if problem is None:  # a run_after on a plugin that is not installed is fine
        assert "odd" in PluginHost().specs
        return
    with pytest.warns(UserWarning, match=problem):
        host = PluginHost()
    assert "odd" in host.failed


def test_plugin_without_switch_is_refused(tmp_path, monkeypatch):
    body = "from trainer_plugins import PluginSpec, hookimpl\n@hookimpl\ndef plugin_spec():\n    return PluginSpec(name='mute')\n"
    install(tmp_path, monkeypatch, "mute", body=body)
    with pytest.warns(UserWarning, match="no arguments dataclass, so it has no switch"):
        PluginHost()


def test_flag_without_plugin_prefix_is_refused(tmp_path, monkeypatch):
    body = textwrap.dedent('''
        from dataclasses import dataclass
        from trainer_plugins import PluginSpec, hookimpl
        @dataclass
        class Args:
            gamma: bool = False
            learning_rate2: float = 1.0
        @hookimpl
        def plugin_spec():
            return PluginSpec(name="gamma", arguments=Args)
    ''')
    install(tmp_path, monkeypatch, "gamma", body=body)
    with pytest.warns(UserWarning, match=r"flags \['learning_rate2'\] do not start with 'gamma_'"):
        PluginHost()


def test_misspelled_hook_is_refused(tmp_path, monkeypatch):
    body = PLUGIN.format(name="typo", extra="") + "\n@hookimpl\ndef prepare_modle(model):\n    return model\n"
    install(tmp_path, monkeypatch, "typo", body=body)
    with pytest.warns(UserWarning, match="plugin 'typo' is not usable: invalid hooks.*prepare_modle"):
        PluginHost()


class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _spec_plugin(spec):
    from trainer_plugins import hookimpl

    class P:
        @hookimpl
        def plugin_spec(self):
            return spec

        @hookimpl
        def prepare_model(self, model, args):
            return model + [spec.name]

    return P()


def _host(*specs):
    return PluginHost(load_entrypoints=False, plugins=[(s.name, _spec_plugin(s)) for s in specs])


def _args_cls(name):
    from dataclasses import make_dataclass

    return make_dataclass(f"{name}Args", [(name, bool, False)])


def test_order_follows_run_after_and_prepare_model_chains():
    a = PluginSpec(name="a", arguments=_args_cls("a"), run_after=("c",))
    b = PluginSpec(name="b", arguments=_args_cls("b"))
    c = PluginSpec(name="c", arguments=_args_cls("c"))
    host = _host(a, b, c)
    args = Obj(a=True, b=True, c=True)
    assert host.enabled(args) == ["b", "c", "a", "host"]
    assert host.pipe("prepare_model", args, "model", []) == ["b", "c", "a"]
    assert host.pipe("prepare_model", Obj(a=False, b="off", c=True), "model", []) == ["c"]


def test_run_after_cycle_is_an_error():
    a = PluginSpec(name="a", arguments=_args_cls("a"), run_after=("b",))
    b = PluginSpec(name="b", arguments=_args_cls("b"), run_after=("a",))
    with pytest.raises(ConfigError, match="run_after cycle"):
        _host(a, b).enabled(Obj(a=True, b=True))


def test_conflicts_requirements_and_capabilities():
    a = PluginSpec(name="a", arguments=_args_cls("a"), conflicts={"b": "both replace the optimizer"})
    b = PluginSpec(name="b", arguments=_args_cls("b"), requires={"no_such_pkg_xyz": "no-such-pkg>=1"},
                   supports=frozenset({"ddp", "zero2"}))
    host = _host(a, b)
    with pytest.raises(PluginConfigError, match="plugin 'a'.*cannot be enabled together with 'b': both replace"):
        host.check(Obj(a=True, b=True), set())
    with pytest.raises(PluginConfigError, match="needs the package 'no_such_pkg_xyz'.*pip install 'no-such-pkg>=1'"):
        host.check(Obj(a=False, b=True), set())
    c = PluginSpec(name="c", arguments=_args_cls("c"), supports=frozenset({"ddp", "zero2"}))
    with pytest.raises(PluginConfigError, match="does not support DeepSpeed ZeRO-3 \\(it works with: a single process, DDP"):
        _host(c).check(Obj(c=True), {"zero3"})
    _host(c).check(Obj(c=True), {"zero2"})


def test_switch_values():
    assert not any(is_switched_on(v) for v in (None, False, "", "off", "None", "no", 0))
    assert all(is_switched_on(v) for v in (True, "mini", "on", 1))


def test_pairs_and_several_processes_on_a_4bit_base_are_cells_of_their_own():
    from trainer_plugins.spec import cell_of

    a = PluginSpec(name="a", arguments=_args_cls("a"), supports=frozenset({"ddp", "zero2", "4bit"}),
                   works_with={"b": frozenset({"single", "zero2"})})
    b = PluginSpec(name="b", arguments=_args_cls("b"), supports=frozenset({"ddp", "zero2", "4bit", "zero2+4bit"}))
    c = PluginSpec(name="c", arguments=_args_cls("c"), supports=frozenset({"ddp"}))
    host = _host(a, b, c)
    host.check(Obj(a=True, b=True), set())
    host.check(Obj(a=True, b=True), {"zero2"})
    with pytest.raises(PluginConfigError, match="with 'b' is tested in a single process, DeepSpeed ZeRO-1/2, not in DDP"):
        host.check(Obj(a=True, b=True), {"ddp"})
    with pytest.raises(PluginConfigError, match="has not been tested together with 'c'.*pairs tested together: a\\+b"):
        host.check(Obj(a=True, c=True), set())
    zero2_4bit = {"zero2", "4bit", "zero2+4bit"}
    assert cell_of(zero2_4bit) == "zero2+4bit" and cell_of({"4bit"}) == "4bit" and cell_of(set()) == "single"
    host.check(Obj(b=True), zero2_4bit)
    host.check(Obj(a=True), {"4bit"})  # each part supported is not enough for the combination:
    with pytest.raises(PluginConfigError, match="does not support DeepSpeed ZeRO-1/2 with a 4-bit base"):
        host.check(Obj(a=True), zero2_4bit)
    bad = PluginSpec(name="d", arguments=_args_cls("d"), works_with={"a": frozenset({"zero9"})},
                     evidence={"zero8": "tests/x.py::test_y"})
    assert len(bad.problems()) == 2
