"""LightningModules: one system per stage."""

from lbgen.models.attribute_extraction import AttributeExtractionSystem
from lbgen.models.autoencoder import AutoencoderTrainer
from lbgen.models.classifier import ImageClassifier
from lbgen.models.clip_trainer import ClipTrainer
from lbgen.models.fewshot import FewShotEpisodes
from lbgen.models.generation import DiffusionGenerator
from lbgen.models.lbgen_trainer import LbGenTrainer
from lbgen.models.quality_trainer import QualityTrainer
from lbgen.models.scoring import SyntheticScorer
from lbgen.models.text_to_image import TextToImageTrainer

__all__ = ["AttributeExtractionSystem", "AutoencoderTrainer", "ClipTrainer", "DiffusionGenerator", "FewShotEpisodes",
           "ImageClassifier", "LbGenTrainer", "QualityTrainer", "SyntheticScorer", "TextToImageTrainer"]
