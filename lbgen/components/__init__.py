"""Plain ``nn.Module`` builders (no Lightning): backbones, safe weight loading."""

from lbgen.components.backbones import TimmBackbone
from lbgen.components.checkpoints import load_state_dict, strip_prefix

__all__ = ["TimmBackbone", "load_state_dict", "strip_prefix"]
