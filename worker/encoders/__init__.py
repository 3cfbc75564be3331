"""Encoders: one factory, one contract, several backends."""

from worker.encoders.base import Encoder, ModelSpec, PreprocessCfg, l2_normalize
from worker.encoders.factory import create_encoder
from worker.encoders.spec import BACKENDS, parse_spec

__all__ = ["BACKENDS", "Encoder", "ModelSpec", "PreprocessCfg", "create_encoder", "l2_normalize", "parse_spec"]
