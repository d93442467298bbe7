"""diffusers backbones with DAR: sublayer-level retrofit of pretrained diffusion transformers.

The only place in dmd_dar that touches diffusers internals. Public API:

    wrapper = wrap_with_dar(diffusers_model, routing_cfg, route_text=False)   # -> DARTransformer
    wrapper(**same_kwargs_as_the_stock_forward)                              # same outputs as the stock model

``ADAPTERS`` maps diffusers class names to their adapters; ``TESTED_DIFFUSERS`` is the proven version range.
"""

from dmd_dar.backbones.compat import TESTED_DIFFUSERS, fingerprint, is_tested_diffusers
from dmd_dar.backbones.registry import ADAPTERS, adapter_for, wrap_with_dar
from dmd_dar.backbones.wrapper import DARTransformer

__all__ = ["ADAPTERS", "DARTransformer", "TESTED_DIFFUSERS", "adapter_for", "fingerprint", "is_tested_diffusers",
           "wrap_with_dar"]
