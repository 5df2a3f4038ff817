"""The check every two-process test ends with (helpers.assert_weights_match) against the bugs it exists to catch:
the one-process reference is reproducible bit for bit (what the DDP tests' exact comparison relies on), and a
run that lost one rank's gradient, or never updated one weight, fails both the exact comparison and the
tolerance that ZeRO's cases use."""

import pytest
from transformers import TrainerCallback

from helpers import as_one_process, assert_weights_match, counting_dataset, one_thread, tiny_llama
from trainer_plugins import PluginTrainer, PluginTrainingArguments

FLAGS = dict(logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2, save_strategy="no",
             disable_tqdm=True, max_steps=8)


class LoseGradient(TrainerCallback):
    """After the first of the two micro-batches, drop its gradient (``names``: only those parameters'): the
    step then sees one rank's half of the batch, as if the other rank's gradient shard were lost."""

    def __init__(self, model, names=None):
        self.params = [p for n, p in model.named_parameters() if names is None or n in names]

    def on_substep_end(self, args, state, control, **kw):
        for p in self.params:
            p.grad = None


def train(callback=None, names=None) -> dict:
    model = tiny_llama()
    callbacks = [LoseGradient(model, names)] if callback else []
    with one_thread():
        trainer = PluginTrainer(model=model, train_dataset=counting_dataset(), callbacks=callbacks,
                                args=PluginTrainingArguments(output_dir="unused", **as_one_process(FLAGS)))
        trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return train()


def test_the_reference_is_reproducible_bit_for_bit(reference):
    assert_weights_match(train(), reference, exact=True)


@pytest.mark.parametrize("names", [None, ["model.layers.1.mlp.down_proj.weight"]],
                         ids=["a rank's whole gradient", "one weight's gradient"])
def test_a_lost_gradient_fails_both_comparisons(reference, names):
    lost = train(callback=True, names=names)
    for exact in (True, False):
        with pytest.raises(AssertionError):
            assert_weights_match(lost, reference, exact)
