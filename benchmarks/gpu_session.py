"""One GPU session's benchmark groups, most wanted first, inside a time budget.

Each group is one `trainer-plugins bench` run (methods against the baselines in the same run) in a process of
its own, so that a group that breaks the CUDA context (a failed graph capture, say) or leaves memory behind
costs no other group its measurements; every case is
written as soon as it is done and, after every group, the whole results folder is packed into one archive
under --pack (a session cut short keeps what finished; the device tool returns at most 8 files). A case
that fails (out of memory, a method broken on this device) is recorded and the next one runs.

    python benchmarks/gpu_session.py --results /tmp/gpu-results --pack $OUT --budget 480
    SHAPE_SMALL=tiny SHAPE_LARGE=tiny SHAPE_LARGEST=tiny python benchmarks/gpu_session.py --device cpu ...  # CPU dry run

Run by gpu_session.sh, which installs the carried wheels and the project first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def groups(small: str, large: str, largest: str = "13b") -> list[tuple[str, str, int | None, list[str]]]:
    """(name, shape, layers, methods), in the order the open issues need them. A name in SCRIPTS runs that
    script in its own process instead of a bench group (methods: its arguments)."""
    return [
        # the open bars first (after session 17, 2026-11-28): LST on 7B with its compiled steps replayed as CUDA
        # graphs (lst_compile alone: 1.16x full FT, CPU-bound at ~2,850 kernels per step; issue 6's bar is 2x) and
        # its profile; the sparse overhead between prune events in interleaved rounds (+4.2% and +8.4% in
        # one-after-the-other groups, -1% before) and the prune event (1.6 steps; issue 4); APOLLO-Mini's 7B step in
        # more interleaved rounds (0.91-1.11x over four measurements; issue 3)
        ("lst", large, None, ["adamw", "lst-compile", "lst-compile-cuda-graphs", "lst-autocast-compile-cuda-graphs",
                              "lst-full-heads-autocast-compile-cuda-graphs",
                              "lst-full-heads-every-2-autocast-compile"]),  # issue 6's bar; the last without CUDA graphs
        ("step-profile", large, None, ["--methods", "lst-compile-cuda-graphs", "lst-autocast-compile-cuda-graphs"]),
        ("timing", small, None, ["--methods", "adamw", "sparse-50", "--rounds", "3", "--steps", "10"]),  # issue 4
        # the prune event without host syncs (histc) against bincount's two per weight and pass, and other digit
        # widths and lane counts (shared-memory histograms need fewer than 100 bins)
        ("prune-event", small, None, ["--configs", "8x16", "8x16-bincount", "8x1", "6x1", "7x4", "5x2", "11x1",
                                      "--rounds", "6", "--steps", "5"]),
        ("sparse", small, None, ["adamw", "sparse-50", "sparse-prune-every-step"]),  # issue 4
        ("timing", large, None, ["--methods", "adamw", "apollo-mini", "apollo-mini-layerwise", "--rounds", "3",
                                  "--steps", "8"]),  # issue 3; layer-wise in batches since 2026-11-29
        ("lst-whole-model", large, None, ["adamw", "lst-full-heads-autocast-torch-compile-cuda-graphs"]),
        # then the rest, again, on this session's versions
        ("lst", small, None, ["adamw", "lora-r16", "lst", "lst-compile", "lst-torch-compile", "lst-autocast",
                              "lst-full-heads-autocast", "lst-4bit-autocast-compile"]),
        ("apollo", small, None, ["adamw", "sgd", "apollo-torch-mini", "apollo-mini", "apollo-mini-embeddings",
                                 "apollo-mini-layerwise", "sgd-checkpointing",
                                 "apollo-mini-layerwise-embeddings-checkpointing"]),
        ("loram", small, None, ["lora", "qlora-peft", "qlora-peft-no-checkpointing", "loram-50", "loram-65",
                                "qloram-65"]),  # the estimate's fix for peft QLoRA with checkpointing on GQA
        ("apollo", large, None, ["adamw", "sgd", "apollo-mini", "apollo-mini-layerwise", "apollo-mini-embeddings",
                                 "apollo-mini-layerwise-embeddings"]),
        ("meft", small, None, ["adamw", "lora", "lora-checkpointing", "meft"]),  # issue 7 (resolved): re-check
        *[("meft", small, n, ["lora", "meft"]) for n in (12, 24, 48)],  # activation memory vs depth
        ("memory-at-peak", small, None, ["--method", "qlora-peft"]),
        ("optimizer-profile", small, None, ["--methods", "adamw", "apollo-mini", "apollo-torch-mini"]),
        ("sparse-semi-structured", small, None, []),  # measured on 2026-11-27 (slower than dense): a re-check
    ]


SCRIPTS = {  # group name: the script and its leading arguments (then --shape, --out)
    "memory-at-peak": ["gpu_diagnostics.py", "memory"],
    "optimizer-profile": ["gpu_diagnostics.py", "profile"],
    "step-profile": ["gpu_diagnostics.py", "step-profile"],
    "timing": ["gpu_diagnostics.py", "timing"],
    "prune-event": ["gpu_diagnostics.py", "prune-event"],
    "sparse-semi-structured": ["sparse_semi_structured.py"],  # 2:4 inference (issue 4), CUDA only
}


def run_script(name: str, shape: str, args: list[str], out: Path, deadline: float) -> bool:
    """One of SCRIPTS in its own process, given what is left of the budget (and a minute); True if it worked."""
    script, *lead = SCRIPTS[name]
    command = [sys.executable, str(Path(__file__).with_name(script)), *lead, *args, "--shape", shape, "--out", str(out)]
    return run_process(name, command, deadline)


def run_bench(label: str, shape: str, layers: int | None, methods: list[str], ns, device: str, out: Path,
              deadline: float) -> bool:
    """One bench group in its own process; no case starts after the deadline, and one that started before it
    gets three minutes (a compiled 7B case's warm-up). True if every case worked."""
    command = [sys.executable, "-m", "trainer_plugins", "bench", "--shape", shape, "--methods", *methods,
               "--device", device, "--warmup", str(ns.warmup), "--steps", str(ns.steps), "--out", str(out),
               "--budget", f"{max(0.0, deadline - time.monotonic()):.0f}",
               *(["--layers", str(layers)] if layers else [])]
    return run_process(label, command, deadline, grace=180)


def run_process(name: str, command: list[str], deadline: float, grace: float = 60) -> bool:
    try:
        return subprocess.run(command, timeout=max(30.0, deadline - time.monotonic() + grace)).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"{name} timed out", flush=True)
        return False


def pack(results: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    partial = into / "gpu-results.tgz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(results, arcname="gpu-results")
    partial.replace(into / "gpu-results.tgz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, required=True, help="folder for the JSON and PNG files")
    p.add_argument("--pack", type=Path, help="folder that receives gpu-results.tgz after every group")
    p.add_argument("--budget", type=float, default=480, help="seconds after which no new case starts")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    ns = p.parse_args(argv)
    deadline = time.monotonic() + ns.budget

    import torch

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    small, large = os.environ.get("SHAPE_SMALL", "1b"), os.environ.get("SHAPE_LARGE", "7b")
    largest = os.environ.get("SHAPE_LARGEST", "13b")
    ns.results.mkdir(parents=True, exist_ok=True)
    failed = []
    only = os.environ.get("BENCH_GROUPS", "").split()  # e.g. BENCH_GROUPS="lst-7b meft-1b-48-layers": those, in that order
    chosen = {f"{name}-{shape}" + (f"-{layers}-layers" if layers else ""): (shape, layers, methods)
              for name, shape, layers, methods in groups(small, large, largest)}
    unknown = [label for label in only if label not in chosen]
    if unknown:
        raise SystemExit(f"BENCH_GROUPS: unknown {unknown}; known: {' '.join(chosen)}")
    for label in only or list(chosen):
        shape, layers, methods = chosen[label]
        if time.monotonic() > deadline:
            print(f"skipped {label}: out of time", flush=True)
            failed.append(f"{label} (skipped)")
            continue
        print(f"== {label}", flush=True)
        name = label.split(f"-{shape}")[0]
        if name in SCRIPTS:
            if device.startswith("cuda") and not run_script(name, shape, methods, ns.results / f"{label}.json",
                                                            deadline):
                failed.append(label)
            if ns.pack:
                pack(ns.results, ns.pack)
            continue
        if not run_bench(label, shape, layers, methods, ns, device, ns.results / f"{label}.json", deadline):
            failed.append(label)
        if ns.pack:
            pack(ns.results, ns.pack)
    print("failed or skipped: " + (", ".join(failed) or "none"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
