"""Parameter-subset masks: the sites of a UNet, the mask language and its ``mask.json`` form, and applying a
mask through peft adapters or ``requires_grad``."""

from .apply import ADAPTER_NAME, AppliedMask, adaptable_sites, adapts, apply_mask, peft_config
from .sites import GRANULARITIES, Site, enumerate_sites, layout_fingerprint, site_pattern
from .spec import FAMILIES, FAMILY_PARAMS, PEFT_FAMILIES, SCHEMA, VERSION, Mask, load_mask

__all__ = [
    "ADAPTER_NAME", "AppliedMask", "FAMILIES", "FAMILY_PARAMS", "GRANULARITIES", "Mask", "PEFT_FAMILIES", "SCHEMA",
    "Site", "VERSION", "adaptable_sites", "adapts", "apply_mask", "enumerate_sites", "layout_fingerprint",
    "load_mask", "peft_config", "site_pattern",
]
