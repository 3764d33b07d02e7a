"""Whole-model conversion from training form to deploy form."""


def switch_to_deploy(model):
    """Convert every module inside ``model`` that offers
    ``switch_to_deploy()``, in place.

    That covers RepVGG and QARepVGG blocks wherever they are (a segmentor, a
    detector, a bare backbone, blocks in a user's neck) and any other block
    with that method. Each module's conversion is idempotent, so is this.

    Args:
        model (nn.Module): The model.

    Returns:
        nn.Module: ``model``.
    """
    for module in list(model.modules()):
        convert = getattr(module, 'switch_to_deploy', None)
        if callable(convert):
            convert()
    return model


def deploy_roots(model):
    """Names of the outermost modules of ``model`` that
    :func:`switch_to_deploy` changes: those that offer ``switch_to_deploy``
    and lie inside no other such module."""
    roots = []
    for name, module in model.named_modules():
        if callable(getattr(module, 'switch_to_deploy', None)) and not any(
                name.startswith(root + '.') for root in roots):
            roots.append(name)
    return roots
