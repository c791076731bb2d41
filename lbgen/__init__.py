"""lbgen: text-to-image diffusion models as training data for image classifiers."""

__version__ = "0.1.0"
