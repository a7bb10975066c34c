"""The FSDP preset: which modules become FSDP units, and that its checkpoints drop the frozen backbone.

FSDP itself cannot run on this CPU-only machine: Lightning refuses ``strategy="fsdp"`` without CUDA, and
PyTorch's FSDP (which our strategy subclass reaches on CPU) raises "FSDP needs a non-CPU accelerator device, but
no accelerator device is detected". These tests check the parts that do not need FSDP to run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_modules import EncoderPretraining

REPO = Path(__file__).resolve().parents[1]


def test_fsdp_preset_names_our_strategy():
    cfg = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())
    assert cfg["trainer"]["strategy"]["class_path"] == "lightning_modules.fsdp.PersonalizationFSDPStrategy"


def test_fsdp_units_hold_every_trainable_parameter_but_the_lora_factors(
    tiny_sd_dir, tiny_personalizer_config
):
    module = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=tiny_personalizer_config,
        token_index_cache=None,
    )
    units = module.fsdp_wrap_modules()
    in_units = {id(p) for u in units for p in u.parameters()}
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    outside = {n for n, p in trainable.items() if id(p) not in in_units}
    # The factors are read by the attention processors outside the hypernetwork's forward: root unit.
    assert outside and all(".hypernetwork.down." in n or ".hypernetwork.up." in n for n in outside)
    unet = module.backbone.unet
    assert all(any(b is u for u in units) for b in [*unet.down_blocks, *unet.up_blocks, unet.mid_block])
    # The checkpoint filter FSDP's save path applies is the module's own.
    assert all(module.checkpointed_key(k) for k in module.state_dict())
    assert not module.checkpointed_key("backbone.unet.conv_in.weight")
