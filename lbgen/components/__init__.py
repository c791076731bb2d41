"""Plain ``nn.Module`` builders (no Lightning): backbones, diffusion generators, CLIP, safe weight loading."""

from lbgen.components.backbones import TimmBackbone
from lbgen.components.checkpoints import load_state_dict, strip_prefix
from lbgen.components.clip import ClipScorer
from lbgen.components.clip_backbone import ClipBackbone
from lbgen.components.diffusion import (
    GeneratorSource,
    NewGenerator,
    PretrainedGenerator,
    build_clip_tokenizer,
    build_generator,
    build_sd_like,
    load_generator,
)

__all__ = ["ClipBackbone", "ClipScorer", "GeneratorSource", "NewGenerator", "PretrainedGenerator", "TimmBackbone",
           "build_clip_tokenizer", "build_generator", "build_sd_like", "load_generator", "load_state_dict",
           "strip_prefix"]
