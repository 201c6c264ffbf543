"""Stage-2 files written before the conditioner existed (checkpoint format version 1): class labels were
embedded inside the UNet (``unet.label_embed`` for ADM, ``unet.class_context`` for cross-attention) and the EMA
held the UNet alone; and files written before the sampling settings were one node (``sampler`` with ``name``).
Their configs and weights map one to one onto today's layout."""

from typing import Any, Mapping

_OLD_TABLES = ("label_embed.weight", "class_context.weight")


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """An older rebuild config in today's form: ``sampler`` as ``sampling``; version 1's ``conditioning`` none / adm
    / crossattn and ``num_classes`` (null class included in the UNet's table, excluded here) as embedder specs."""
    config = dict(config)
    if "sampler" in config:  # before the sampling node: {name, steps, eta, guidance_scale}
        sampler = dict(config.pop("sampler"))
        config["sampling"] = {"sampler": sampler.pop("name", "dpmpp_2m"), **sampler}
    old = config.get("conditioning")
    if isinstance(old, dict):
        return config
    num_classes = config.pop("num_classes", None)
    unet = dict(config["unet"])
    context_dim = unet.pop("context_dim", None)
    for key in ("conditioning", "num_classes"):
        unet.pop(key, None)
    config["unet"] = unet
    if old in (None, "none"):
        config["conditioning"] = {}
    else:
        config["conditioning"] = {"class": {
            "kind": "class", "num_classes": num_classes, "output": "vector" if old == "adm" else "context",
            "dim": 4 * unet.get("model_channels", 128) if old == "adm" else context_dim, "drop_rate": 0.1}}
    return config


def upgrade_state_dict(state: Mapping[str, Any], conditioner) -> dict[str, Any]:
    """Version-1 keys to today's: the UNet's class table moves to the class embedder, and the EMA copy of the
    UNet moves under ``ema.model.unet.`` (the EMA now holds the UNet and the conditioner)."""
    name = next((n for n, e in conditioner.embedders.items() if e.kind == "class"), None)
    upgraded = {}
    for key, value in state.items():
        for prefix, new_prefix in (("unet.", "unet."), ("ema.model.", "ema.model.unet.")):
            if key.startswith(prefix) and not key.startswith(("ema.model.unet.", "ema.model.conditioner.")):
                rest = key[len(prefix):]
                if rest in _OLD_TABLES and name is not None:
                    owner = "conditioner." if prefix == "unet." else "ema.model.conditioner."
                    key = f"{owner}embedders.{name}.table.weight"
                else:
                    key = new_prefix + rest
                break
        upgraded[key] = value
    return upgraded
