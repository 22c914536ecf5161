"""The model zoo: bundled trained models, speed-only twins, their data and training."""

from effdiff.zoo.load import BUNDLED, ModelNotFoundError, check_model, load, load_feature_extractor
from effdiff.zoo.twins import TWINS

__all__ = ["BUNDLED", "TWINS", "ModelNotFoundError", "check_model", "load", "load_feature_extractor"]
