"""Serving an exported model: a one-call Python API (`Predictor`) and an
HTTP service (`python -m serve`). Imports mm_models and data_pipeline,
never train."""

from serve.inputs import InputError, Limits
from serve.predictor import Predictor, TorchBackend

__all__ = ["InputError", "Limits", "Predictor", "TorchBackend"]
