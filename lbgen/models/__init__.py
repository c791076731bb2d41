"""LightningModules: one system per stage."""

from lbgen.models.attribute_extraction import AttributeExtractionSystem
from lbgen.models.autoencoder import AutoencoderSystem
from lbgen.models.card import DataCardSystem
from lbgen.models.classifier import ClassifierSystem
from lbgen.models.clip import ClipSystem
from lbgen.models.fewshot import FewShotSystem
from lbgen.models.generation import GenerationSystem
from lbgen.models.lbgen_finetune import LbGenSystem
from lbgen.models.quality import QualitySystem
from lbgen.models.retrieval import RetrievalSystem
from lbgen.models.scoring import ScoringSystem
from lbgen.models.text_to_image import TextToImageSystem

__all__ = ["AttributeExtractionSystem", "AutoencoderSystem", "ClipSystem", "DataCardSystem", "GenerationSystem",
           "FewShotSystem", "ClassifierSystem", "LbGenSystem", "QualitySystem", "RetrievalSystem", "ScoringSystem",
           "TextToImageSystem"]
