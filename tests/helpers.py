"""Small helpers the test files share (plain functions; fixtures live in conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def losses(trainer) -> list[float]:
    """The training losses a Trainer logged, in order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def counting_dataset():
    """Runs of consecutive token ids (vocab 1000): learnable in a few dozen steps, unlike random tokens."""
    return [{"input_ids": [(s * 7 + k) % 1000 for k in range(32)], "labels": [(s * 7 + k) % 1000 for k in range(32)]}
            for s in range(64)]


def torchrun_cli(args, port: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`trainer-plugins ARGS` in 2 CPU processes (torchrun, gloo), without DeepSpeed's shm JIT build."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(ROOT / "tests" / "host" / "cli_no_shm.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
