"""`trainer-plugins` for torchrun in tests, without DeepSpeed's 30-50 s JIT build of its shared-memory op
on CPU (gloo does the communication; the op is only an optimisation)."""

import importlib
import sys

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

from trainer_plugins.cli import main  # noqa: E402

sys.exit(main())
