"""LST's methods for `trainer-plugins bench`: a frozen (optionally NF4) backbone and a float32 side network of
width d/8 on every layer, or every 2nd (random init: memory and speed do not depend on the values); the
``-autocast`` ones run it as the recipes do with ``bf16: true`` (bf16 matmuls over the float32 side weights);
``-full-heads`` ones keep whole heads of the backbone's size, r times fewer (lst_head_size full)."""

from trainer_plugins.bench import BenchMethod, nf4


def _lst(reduction=8, four_bit=False, layers="all", head_size="reduced"):
    def prepare(model):
        from . import families
        from .plugin import layer_ids
        from .pruning import SideSettings, build, init_random
        from .side import attach

        if four_bit:
            nf4(model)
        model.requires_grad_(False)
        chosen = layer_ids(layers, model.config.num_hidden_layers)  # as the flag lst_layers
        r = reduction if head_size == "reduced" else min(reduction, model.config.num_attention_heads)  # tiny shape
        families.check(model.config, r, chosen, head_size)
        side = build(model, SideSettings(reduction=r, layer_ids=chosen, head_size=head_size))
        device = model.get_input_embeddings().weight.device
        side.to(device)
        if device.type != "meta":  # estimates run on the meta device: shapes only
            init_random(model, side)
        attach(model, side, families.layers_of(model))
        return model

    return prepare


METHODS = {
    "lst": BenchMethod(prepare=_lst(), description="LST r8 side network, frozen backbone"),
    "lst-4bit": BenchMethod(prepare=_lst(four_bit=True), description="LST r8 side network, NF4 backbone"),
    # as the recipes train (bf16: true): the float32 side network's matmuls under bf16 autocast
    "lst-autocast": BenchMethod(prepare=_lst(), autocast=True, description="LST r8, bf16 autocast (bf16: true)"),
    "lst-4bit-autocast": BenchMethod(prepare=_lst(four_bit=True), autocast=True,
                                     description="LST r8, NF4 backbone, bf16 autocast (bf16: true)"),
    "lst-every-2-autocast": BenchMethod(prepare=_lst(layers="every:2"), autocast=True,
                                        description="LST r8 on every 2nd layer (lst_layers every:2), bf16 autocast"),
    # attention kernels built for whole heads (128 on the 7B shape) instead of 32 heads of 16 (or 8 on 1B)
    "lst-full-heads": BenchMethod(prepare=_lst(head_size="full"),
                                  description="LST r8 with whole heads, r times fewer (lst_head_size full)"),
    "lst-full-heads-autocast": BenchMethod(prepare=_lst(head_size="full"), autocast=True,
                                           description="LST r8 with whole heads (lst_head_size full), bf16 autocast"),
}
