"""BOB's class-agnostic attributes: extractors, the attribute bank, captions."""

from lbgen.attributes.bank import (
    DEFAULT_CAPTION,
    AttributeBank,
    mentions_class,
    scrub_class_names,
)
from lbgen.attributes.captioner import CaptionerAttributeExtractor
from lbgen.attributes.extractors import AttributeExtractor, ClipAttributeExtractor

__all__ = ["DEFAULT_CAPTION", "AttributeBank", "AttributeExtractor", "CaptionerAttributeExtractor",
           "ClipAttributeExtractor", "mentions_class", "scrub_class_names"]
