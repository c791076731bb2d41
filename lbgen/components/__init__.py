"""Plain ``nn.Module`` builders (no Lightning): backbones, diffusion generators, CLIP, safe weight loading."""

from lbgen.components.backbones import TimmBackbone
from lbgen.components.checkpoints import load_state_dict, strip_prefix
from lbgen.components.clip import ClipScorer
from lbgen.components.diffusion import (
    GeneratorSource,
    NewGenerator,
    PretrainedGenerator,
    build_clip_tokenizer,
    build_generator,
    load_generator,
)

__all__ = ["ClipScorer", "GeneratorSource", "NewGenerator", "PretrainedGenerator", "TimmBackbone",
           "build_clip_tokenizer", "build_generator", "load_generator", "load_state_dict", "strip_prefix"]
