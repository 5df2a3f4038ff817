"""LST's methods for `trainer-plugins bench`: a frozen (optionally NF4) backbone and a float32 side network of
width d/8 on every layer (random init: memory and speed do not depend on the values)."""

from trainer_plugins.bench import BenchMethod, nf4


def _lst(reduction=8, four_bit=False):
    def prepare(model):
        from .families import layers_of
        from .pruning import SideSettings, build, init_random
        from .side import attach

        if four_bit:
            nf4(model)
        model.requires_grad_(False)
        side = build(model, SideSettings(reduction=reduction, layer_ids=list(range(model.config.num_hidden_layers))))
        device = model.get_input_embeddings().weight.device
        side.to(device)
        if device.type != "meta":  # estimates run on the meta device: shapes only
            init_random(model, side)
        attach(model, side, layers_of(model))
        return model

    return prepare


METHODS = {
    "lst": BenchMethod(prepare=_lst(), description="LST r8 side network, frozen backbone"),
    "lst-4bit": BenchMethod(prepare=_lst(four_bit=True), description="LST r8 side network, NF4 backbone"),
}
