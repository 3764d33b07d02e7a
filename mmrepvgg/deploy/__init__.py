"""From a trained model to a deployed one: conversion to the plain-conv
form, verified deploy checkpoints, and faster inference heads."""
from .convert import switch_to_deploy
from .folded_psp import FoldedPSPHead, fold_psp_heads
from .pair import ReparameterizeResult, deploy_config_path, reparameterize
from .verify import relative_error

__all__ = [
    'switch_to_deploy', 'FoldedPSPHead', 'fold_psp_heads',
    'ReparameterizeResult', 'deploy_config_path', 'reparameterize',
    'relative_error'
]
