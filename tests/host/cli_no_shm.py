"""`trainer-plugins` for torchrun in tests, without DeepSpeed's 30-50 s JIT build of its shared-memory op
on CPU (gloo does the communication; the op is only an optimisation)."""

import importlib
import sys
from pathlib import Path

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from trainer_plugins import cli  # noqa: E402
from helpers import exit_worker, run_worker_jobs  # noqa: E402


def run(*args: str) -> None:
    code = cli.main(list(args))
    if code:
        raise SystemExit(f"trainer-plugins {' '.join(args)} exited with {code}")


if sys.argv[1:2] == ["--jobs"]:  # several runs in one launch (helpers.shared_torchrun): one process group for all
    cli.end_distributed = lambda: None  # run_worker_jobs ends it after the last
    run_worker_jobs(run)
else:
    exit_worker(cli.main())
