"""Key layouts of published RepVGG weights, translated to ours.

Ours is the OpenMMLab model-zoo layout (``stem.branch_3x3.conv.weight``,
``stage_1.0.branch_norm.weight``, ...). The official release
(DingXiaoH/RepVGG) names the same tensors ``stage0.rbr_dense.conv.weight``,
``stage1.0.rbr_identity.weight`` and so on.
"""
import re

_STAGE = re.compile(r'^stage(\d+)\.')
# Official sub-module names and ours, as whole dotted path segments.
_OFFICIAL_NAMES = (
    ('rbr_dense.bn.', 'branch_3x3.norm.'),
    ('rbr_dense.conv.', 'branch_3x3.conv.'),
    ('rbr_1x1.bn.', 'branch_1x1.norm.'),
    ('rbr_1x1.conv.', 'branch_1x1.conv.'),
    ('rbr_identity.', 'branch_norm.'),
    ('rbr_reparam.', 'branch_reparam.'),
    ('se.down.', 'se_layer.conv1.conv.'),
    ('se.up.', 'se_layer.conv2.conv.'),
)
# Wrappers around the backbone keys: DataParallel and classifier files.
_WRAPPERS = ('module.', 'backbone.')
# Image classification heads, which a dense-prediction backbone has no use
# for: the official ``linear`` layer and the model zoo's ``head``.
_CLASSIFIER_HEADS = ('linear.', 'head.')


def _rename(key):
    for wrapper in _WRAPPERS:
        if key.startswith(wrapper):
            key = key[len(wrapper):]
    match = _STAGE.match(key)
    if match is None:
        return key
    stage = int(match.group(1))
    key = ('stem.' if stage == 0 else f'stage_{stage}.') + key[match.end():]
    for official, ours in _OFFICIAL_NAMES:
        key = key.replace('.' + official, '.' + ours)
    return key


def to_mmrepvgg_layout(state_dict, prefix='', deploy=None):
    """Rename RepVGG weights to our layout, in place.

    Keys under ``prefix`` in the official or the model-zoo layout, with or
    without a ``module.`` or ``backbone.`` wrapper, are renamed; classifier
    heads are dropped. Other keys are left alone.

    Args:
        state_dict (dict): Weights; modified in place.
        prefix (str): Only keys starting with it are translated, and it is
            kept in front of them. Defaults to ''.
        deploy (bool, optional): The form of the model the weights are for.
            When given, weights of the other form raise a ``ValueError``
            that says how to build a matching model.

    Returns:
        dict: ``state_dict``, for chaining.
    """
    keys = [k for k in state_dict if k.startswith(prefix)]
    for key in keys:
        renamed = _rename(key[len(prefix):])
        value = state_dict.pop(key)
        if not renamed.startswith(_CLASSIFIER_HEADS):
            state_dict[prefix + renamed] = value
    if deploy is not None:
        holds_deploy = any('.branch_reparam.' in k for k in state_dict
                           if k.startswith(prefix))
        holds_train = any('.branch_3x3.' in k for k in state_dict
                          if k.startswith(prefix))
        if holds_deploy and not deploy:
            raise ValueError(
                'these RepVGG weights are in deploy (re-parameterized) form; '
                'build the backbone with deploy=True to load them')
        if holds_train and deploy:
            raise ValueError(
                'these RepVGG weights are in training (multi-branch) form; '
                'build the backbone with deploy=False, load them, then call '
                'switch_to_deploy()')
    return state_dict
