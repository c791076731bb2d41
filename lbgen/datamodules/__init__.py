"""Real-data DataModules: built-in datasets, ImageFolder, seeded k-shot / long-tail splits."""

from lbgen.datamodules.base import REAL, SYNTHETIC, ClassificationDataset, ImageClassificationDataModule
from lbgen.datamodules.captioned import AttributeCaptionedDataModule
from lbgen.datamodules.class_names import ClassNamesDataModule
from lbgen.datamodules.contextual import ContextualFashionMNISTDataModule
from lbgen.datamodules.episodes import EpisodeDataModule
from lbgen.datamodules.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from lbgen.datamodules.fashion_mnist import FashionMNISTDataModule
from lbgen.datamodules.image_folder import BadImageError, ImageFolderDataModule
from lbgen.datamodules.order import KeyedDataset, SeededDistributedSampler
from lbgen.datamodules.packaged import PackagedImageDataModule
from lbgen.datamodules.reference import RealReferenceDataModule
from lbgen.datamodules.requests import GenerationRequestsDataModule
from lbgen.datamodules.splits import Split, long_tail_counts, make_split
from lbgen.datamodules.synthetic import MixedDataModule, SyntheticDataModule
from lbgen.storage.dataset_format import read_manifest, request_seed

__all__ = ["REAL", "SYNTHETIC", "FASHION_MNIST_CLASSES", "AttributeCaptionedDataModule", "BadImageError",
           "ClassNamesDataModule", "ClassificationDataset", "ContextualFashionMNISTDataModule", "EpisodeDataModule",
           "FashionMNISTDataModule", "GenerationRequestsDataModule", "ImageClassificationDataModule",
           "ImageFolderDataModule", "KeyedDataset", "MixedDataModule", "PackagedImageDataModule",
           "RealReferenceDataModule", "SeededDistributedSampler", "Split", "SyntheticDataModule", "long_tail_counts",
           "make_split", "read_manifest", "request_seed"]
