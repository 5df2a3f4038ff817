"""`trainer-plugins` for torchrun in tests, without DeepSpeed's 30-50 s JIT build of its shared-memory op
on CPU (gloo does the communication; the op is only an optimisation)."""

import importlib
import sys
from pathlib import Path

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from trainer_plugins.cli import main  # noqa: E402
from helpers import exit_worker  # noqa: E402

exit_worker(main())
