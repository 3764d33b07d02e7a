"""From a trained model to a deployed one: conversion to the plain-conv
form, verified deploy checkpoints, ONNX export, inference engines, and
faster inference heads."""
from .convert import switch_to_deploy
from .export import ExportResult, export_onnx
from .folded_psp import FoldedPSPHead, fold_psp_heads
from .onnx_model import ExportedModelInfo
from .pair import (ReparameterizeResult, deploy_config_path, deploy_model,
                   reparameterize)
from .runtime import EngineSegmentor, SegmentationEngine
from .verify import relative_error

__all__ = [
    'switch_to_deploy', 'ExportedModelInfo', 'ExportResult', 'export_onnx',
    'FoldedPSPHead', 'fold_psp_heads', 'ReparameterizeResult',
    'deploy_config_path', 'deploy_model', 'reparameterize', 'EngineSegmentor',
    'SegmentationEngine', 'relative_error'
]
