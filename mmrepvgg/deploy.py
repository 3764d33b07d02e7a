"""Whole-model conversion from training form to deploy form."""
from .models import RepVGG, RepVGGBlock


def switch_to_deploy(model):
    """Fold every RepVGG block anywhere inside ``model`` into one conv.

    Works on any model that contains RepVGG blocks: a segmentor, a detector,
    a bare backbone, or blocks used outside a backbone. Idempotent.

    Args:
        model (nn.Module): The model, converted in place.

    Returns:
        nn.Module: ``model``.
    """
    for module in list(model.modules()):
        if isinstance(module, (RepVGG, RepVGGBlock)):
            module.switch_to_deploy()
    return model
