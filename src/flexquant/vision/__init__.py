"""PTQ for image classifiers: BRECQ-style block reconstruction (AdaRound + LSQ + QDrop) and the
meta-learning step of arXiv 2407.14726 (a U-Net that transforms calibration images, trained bi-level)."""

from .api import QuantizedClassifier, evaluate_top1, quantize_classifier
from .checkpoint import load_quantized, save_quantized
from .config import VisionQuantConfig
from .data import load_image_folder
from .errors import VisionError
from .models import build_model, load_weights

__all__ = [
    "QuantizedClassifier",
    "VisionError",
    "VisionQuantConfig",
    "build_model",
    "evaluate_top1",
    "load_image_folder",
    "load_quantized",
    "load_weights",
    "quantize_classifier",
    "save_quantized",
]
