"""`trainer-plugins bench` runs every method, baselines and plugins' alike, end to end (tiny shape, CPU) and
writes its report. Speed numbers come from GPU runs committed under benchmarks/results/; what a CPU run does
check is `trainer-plugins estimate` against the allocator's peak (profiler) for every method."""

import importlib.metadata
import json
import re

import pytest

from trainer_plugins.bench import BASELINES, methods
from trainer_plugins.cli import main as cli
from trainer_plugins.errors import ConfigError


def _method_groups() -> dict[str, list[str]]:
    """Every bench method in a few groups of similar cost, so that parallel test workers share them (the whole run
    is ~2-4 minutes on 2 CPU cores, compiled cases the most)."""
    names = list(methods())
    compiled = [n for n in names if "compile" in n]
    plugin = [n for n in names if n not in BASELINES and n not in compiled]
    return {"baselines": list(BASELINES), "plugins-a": plugin[: len(plugin) // 2],
            "plugins-b": plugin[len(plugin) // 2:], "compiled-a": compiled[: len(compiled) // 2],
            "compiled-b": compiled[len(compiled) // 2:]}


def test_the_method_groups_cover_every_method():
    groups = _method_groups()
    flat = [n for group in groups.values() for n in group]
    assert sorted(flat) == sorted(methods()) and len(flat) == len(set(flat))
    for plugin_method in ("apollo-mini", "loram-65", "qloram-65", "lst", "lst-4bit", "meft", "sparse-50"):
        assert plugin_method in flat  # from the plugins' benchmark_methods hooks


@pytest.mark.latest_only  # minutes; the plugins' own tests run on both suites
@pytest.mark.parametrize("group", list(_method_groups()))
def test_every_method_runs_and_the_report_is_complete(group, tmp_path):
    chosen = _method_groups()[group]
    out = tmp_path / "r.json"
    assert cli(["bench", "--shape", "tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--methods", *chosen,
                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["method"] for r in report["results"]]
    assert names == chosen
    for key in ("device", "date", "command", "torch", "shape", "dtype"):
        assert report[key]
    assert report["versions"]["peft"] == importlib.metadata.version("peft")  # what an estimate compares under
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "deepspeed"}
    for r in report["results"]:
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["param_gib"] > 0
        assert r["estimate_gib"] >= r["param_gib"]  # every case can be estimated (meta device)
        assert r[f"step_vs_{chosen[0]}"] > 0  # ratios to the report's first case
        # ... and the estimate is the peak the CPU allocator saw in the step (seen: 0.985-1.015)
        if r["method"] == "sparse-prune-every-step":
            # a prune event's workspace (a 2049-bin int64 histogram per weight, a few of one weight's score-sized
            # temporaries) is not part of the training estimate: at this tiny shape it tops the step's own
            # peak, by at most ~2 MiB
            assert 0 <= r["peak_gib"] - r["estimate_gib"] <= 0.002, r
            continue
        if r.get("estimate") == "eager":  # compiled: fused kernels drop some of eager's temporaries (seen: 1.19)
            assert "compile" in r["method"] and 0.95 < r["estimate_vs_peak"] < 1.3, r
            continue
        assert 0.95 < r["estimate_vs_peak"] < 1.05, r
    # random tokens over 1000 ids: three small steps leave every method's loss near ln(1000) = 6.9
    losses = {r["method"]: r["final_loss"] for r in report["results"]}
    assert all(6.0 < v < 7.5 for v in losses.values())


def test_depth_override_and_bad_input(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert cli(["bench", "--shape", "tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--layers", "3",
                "--methods", "lora", "meft", "--out", str(out)]) == 0
    assert [r["layers"] for r in json.loads(out.read_text())["results"]] == [3, 3]
    assert cli(["bench", "--methods", "list"]) == 0
    assert "MEFT1, float64 streams every 4 layers" in capsys.readouterr().out
    assert cli(["bench", "--methods", "nope", "--out", str(out)]) == 2
    assert "unknown bench methods ['nope']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs --out"):
        from argparse import Namespace

        from trainer_plugins.bench import run

        run(Namespace(methods=["lora"], out=None))


def test_estimate_only_predicts_every_case_without_a_step(tmp_path):
    out = tmp_path / "e.json"
    methods_ = ["lora", "lora-checkpointing", "qloram-65", "qloram-65-checkpointing"]
    assert cli(["bench", "--shape", "tiny", "--layers", "4", "--estimate-only", "--methods", *methods_,
                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and "estimate" in report["device"]
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == methods_ and all(set(r) == {"method", "estimate_gib", "estimate_vs_lora"} for r in rows.values())
    assert rows["lora"]["estimate_vs_lora"] == 1.0
    # checkpointing drops the stored activations in both; QLoRAM stays below LoRA either way
    assert rows["qloram-65-checkpointing"]["estimate_gib"] < rows["qloram-65"]["estimate_gib"] < rows["lora"]["estimate_gib"]
    assert rows["lora-checkpointing"]["estimate_gib"] < rows["lora"]["estimate_gib"]
    assert not out.with_suffix(".png").exists()


def test_a_failing_case_is_recorded_and_the_next_one_runs(tmp_path, capsys):
    """One broken method (an OOM on the GPU, say) must not cost the rest of a paid GPU session."""
    from trainer_plugins.bench import BenchMethod

    def broken(model, lr):
        raise RuntimeError("CUDA out of memory (simulated)")

    host_methods = dict(methods(), broken=BenchMethod(optimizer=broken))
    from argparse import Namespace
    from unittest import mock

    from trainer_plugins import bench

    out = tmp_path / "f.json"
    ns = Namespace(methods=["broken", "sgd"], out=out, device="cpu", dtype=None, shape="tiny", layers=None,
                   warmup=0, steps=1)
    with mock.patch.object(bench, "methods", return_value=host_methods):
        assert bench.run(ns) == 1  # the exit status says a case failed
    results = json.loads(out.read_text())["results"]
    assert results[0] == {"method": "broken", "error": "RuntimeError: CUDA out of memory (simulated)"}
    assert results[1]["method"] == "sgd" and results[1]["peak_gib"] >= 0 and results[1]["step_vs_sgd"] == 1.0
    assert "broken failed" in capsys.readouterr().err


def test_no_case_starts_after_the_budget(tmp_path):
    """gpu_session.py gives each group's process what is left of the session's budget."""
    out = tmp_path / "b.json"
    assert cli(["bench", "--shape", "tiny", "--device", "cpu", "--methods", "sgd", "adamw", "--budget", "0",
                "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"] == [{"method": "sgd", "skipped": "out of time"},
                                                      {"method": "adamw", "skipped": "out of time"}]


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) loaded as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_summary_measures_the_leftover_offset_from_repeated_cases(tmp_path):
    summary_module = benchmark_script("gpu_summary")

    def report(shape, rows):
        return {"shape": shape, "device": "GPU", "torch": "2.x", "versions": {"peft": "0.x"}, "dtype": "bfloat16",
                "date": "d", "warmup": 1, "steps": 1, "results": [dict(method=m, layers=2, peak_gib=p, activation_gib=1.0, param_gib=0.5,
                                             median_step_s=0.1, tokens_per_s=10.0, estimate_gib=e)
                                        for m, p, e in rows]}

    groups = {"meft-1b": report("1b", [("adamw", 10.0, 10.0), ("lora", 8.0, 8.0)]),
              "apollo-1b": report("1b", [("adamw", 10.0, 10.0)]),
              "lst-7b": report("7b", [("adamw", 52.0, 50.0)]),
              "loram-1b": report("1b", [("lora", 10.0, 8.0)]),
              "lst-1b": report("1b", [("adamw", 12.0, 10.0)])}
    s = summary_module.summarise(groups, "apollo-1b")
    assert s["versions"] == {"peft": "0.x"}  # tests compare estimates with the figures only under these
    assert s["leftover_correction"]["offset_gib"] == 2.0
    peaks = {(r["group"], r["method"]): r["peak_gib"] for r in s["results"]}
    assert peaks[("meft-1b", "adamw")] == 10.0 and peaks[("lst-7b", "adamw")] == 50.0
    assert s["estimate_within_10_percent"] == "6 of 6"
    with pytest.raises(SystemExit, match="cannot be measured"):
        summary_module.summarise({"meft-1b": groups["meft-1b"], "lst-7b": groups["lst-7b"]}, "meft-1b")


def test_every_gpu_session_method_exists():
    """A typo in the prepared GPU run would cost a case of a session that has minutes of device time."""
    session = benchmark_script("gpu_session")
    groups = session.groups("1b", "7b")
    labels = [f"{name}-{shape}-{layers}" for name, shape, layers, _ in groups]
    assert len(labels) == len(set(labels)), "two groups share a label: the second would replace the first"
    named = {m for name, _, _, group in groups if name not in session.SCRIPTS for m in group}
    assert named and not named - set(methods())
    # the diagnostics' cases too, and their arguments parse
    diagnostics = benchmark_script("gpu_diagnostics")
    for name, shape, _, arguments in groups:
        if session.SCRIPTS.get(name, [""])[0] == "gpu_diagnostics.py":
            ns = diagnostics.build_parser().parse_args([session.SCRIPTS[name][1], *arguments, "--shape", shape,
                                                        "--out", "x.json"])
            assert not {ns.method, *ns.methods} - set(methods())
            assert all(re.fullmatch(r"\d+x\d+(-bincount)?", c) for c in ns.configs), ns.configs


def test_apollo_quality_seed_runs_and_their_same_seed_summary():
    quality = benchmark_script("apollo_quality")
    plan = quality.sweep(None, [3e-4], ["--apollo_scale 512"], seeds=[42, 7], default_mini=False)
    # the recipe's seed keeps its earlier names and folders; other seeds get their own, with --seed
    assert list(plan) == ["finetune/adamw@0.0003", "finetune/apollo-mini[--apollo_scale 512]@0.0003",
                          "finetune/adamw@0.0003#seed7", "finetune/apollo-mini[--apollo_scale 512]@0.0003#seed7"]
    assert "--seed" not in plan["finetune/adamw@0.0003"]
    seven = plan["finetune/apollo-mini[--apollo_scale 512]@0.0003#seed7"]
    assert seven[seven.index("--seed") + 1] == "7" and seven[seven.index("--output_dir") + 1].endswith("-seed7")
    loss = {"finetune/adamw@0.0003": 2.0, "finetune/apollo-mini[--apollo_scale 512]@0.0003": 2.1,
            "finetune/adamw@0.0003#seed7": 3.0, "finetune/apollo-mini[--apollo_scale 512]@0.0003#seed7": 2.7}
    summary = quality.seed_summary(loss, [42, 7])
    mini = summary["ratio_over_seeds"]["finetune/apollo-mini[--apollo_scale 512]@0.0003"]
    assert mini["mean"] == pytest.approx((1.05 + 0.9) / 2) and mini["within_2_percent"] == "1 of 2"
    assert summary["eval_loss_over_seeds"]["finetune/adamw@0.0003"]["mean"] == 2.5
