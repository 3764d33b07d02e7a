"""Key layouts of published RepVGG weights, and the one this package uses.

Ours is the OpenMMLab model zoo's (mmcls 0.x, mmpretrain 1.x), so weights
move between mmpretrain's classifier and our backbone unchanged. Also read:
the official release (DingXiaoH/RepVGG: ``stage0.rbr_dense.conv.weight``,
``rbr_1x1``, ``rbr_identity``, ``se.down``, a ``linear`` classifier,
sometimes under ``module.``) and mmrepvgg 0.1 (``branch_3x3.bn.weight``).
"""
import enum
import re

from ..errors import CheckpointError, first_keys

__all__ = [
    'Layout', 'detect_layout', 'to_mmrepvgg_layout', 'check_weights_fit',
    'is_deploy_form'
]


class Layout(enum.Enum):
    """A key layout of RepVGG weights; the value names it in messages."""
    ZOO = 'OpenMMLab model zoo'
    OFFICIAL = 'official release'
    MMREPVGG_0_1 = 'mmrepvgg 0.1'
    UNKNOWN = 'unknown'


_OFFICIAL_STAGE = re.compile(r'^stage(\d+)\.')
_OFFICIAL = re.compile(r'^stage\d+\.|\.(rbr_dense|rbr_1x1|rbr_identity|'
                       r'rbr_reparam|se\.down|se\.up)\.')
_MMREPVGG_0_1_NORM = re.compile(r'\.branch_(3x3|1x1)\.bn\.')
# Sub-module names of other layouts and ours, as whole dotted segments.
_RENAMES = (
    ('rbr_dense.bn.', 'branch_3x3.norm.'),
    ('rbr_dense.conv.', 'branch_3x3.conv.'),
    ('rbr_1x1.bn.', 'branch_1x1.norm.'),
    ('rbr_1x1.conv.', 'branch_1x1.conv.'),
    ('rbr_identity.', 'branch_norm.'),
    ('rbr_reparam.', 'branch_reparam.'),
    ('se.down.', 'se_layer.conv1.conv.'),
    ('se.up.', 'se_layer.conv2.conv.'),
    ('branch_3x3.bn.', 'branch_3x3.norm.'),
    ('branch_1x1.bn.', 'branch_1x1.norm.'),
)
# Wrappers around the backbone keys: DataParallel and classifier files.
_WRAPPERS = ('module.', 'backbone.')
# Image classification heads, which a dense-prediction backbone has no use
# for: the official ``linear`` layer and the model zoo's ``head``.
_CLASSIFIER_HEADS = ('linear.', 'head.')


def _unwrap(key):
    for wrapper in _WRAPPERS:
        key = key.removeprefix(wrapper)
    return key


def detect_layout(keys):
    """The :class:`Layout` of backbone keys (with or without wrappers)."""
    keys = [_unwrap(k) for k in keys]
    if any(_OFFICIAL.search(k) for k in keys):
        return Layout.OFFICIAL
    if any(_MMREPVGG_0_1_NORM.search(k) for k in keys):
        return Layout.MMREPVGG_0_1
    if any(k.startswith(('stem.', 'stage_')) for k in keys):
        return Layout.ZOO
    return Layout.UNKNOWN


def _rename(key):
    key = _unwrap(key)
    match = _OFFICIAL_STAGE.match(key)
    if match is not None:
        stage = int(match.group(1))
        key = ('stem.'
               if stage == 0 else f'stage_{stage}.') + key[match.end():]
    for theirs, ours in _RENAMES:
        key = key.replace('.' + theirs, '.' + ours)
    return key


def to_mmrepvgg_layout(state_dict, prefix=''):
    """Rename RepVGG weights under ``prefix`` to our layout, in place.

    Keys in any layout this module reads, with or without a ``module.`` or
    ``backbone.`` wrapper, are renamed; classifier heads are dropped; the
    prefix stays in front. Keys outside ``prefix`` are left alone.

    Args:
        state_dict (dict): Weights; modified in place.
        prefix (str): Only keys starting with it are translated.
            Defaults to ''.

    Returns:
        Layout: The layout the keys were in.
    """
    keys = [k for k in state_dict if k.startswith(prefix)]
    layout = detect_layout(k[len(prefix):] for k in keys)
    for key in keys:
        renamed = _rename(key[len(prefix):])
        value = state_dict.pop(key)
        if not renamed.startswith(_CLASSIFIER_HEADS):
            state_dict[prefix + renamed] = value
    return layout


def check_weights_fit(expected, provided, layout, deploy, prefix=''):
    """Raise unless ``provided`` holds exactly the tensors of a backbone.

    Args:
        expected (dict[str, Tensor]): The backbone's state dict.
        provided (dict[str, Tensor]): Weights in our layout, without prefix.
        layout (Layout): The layout they came in, for the message.
        deploy (bool): The backbone's form.
        prefix (str): Put in front of the keys named in messages.
            Defaults to ''.

    Raises:
        CheckpointError: Weights of the other form (the message says how to
            build a matching backbone), or weights that are missing (other
            than ``num_batches_tracked``), unused or of another shape; the
            first few keys are named.
    """
    _check_form(provided, deploy)
    missing = [
        k for k in expected
        if k not in provided and not k.endswith('num_batches_tracked')
    ]
    unexpected = [k for k in provided if k not in expected]
    reshaped = [
        f'{k} {tuple(provided[k].shape)} for {tuple(expected[k].shape)}'
        for k in expected
        if k in provided and provided[k].shape != expected[k].shape
    ]
    problems = [
        f'{name} {first_keys(prefix + k for k in keys)}'
        for name, keys in (('missing', missing), ('unexpected', unexpected),
                           ('shape of', reshaped)) if keys
    ]
    if problems:
        raise CheckpointError(
            f'RepVGG weights ({layout.value} layout) do not fit the '
            'backbone: ' + '; '.join(problems))


def is_deploy_form(keys):
    """Whether weight names (our layout, any prefix) are those of blocks in
    deploy form."""
    return any('.branch_reparam.' in k for k in keys)


def _check_form(provided, deploy):
    holds_deploy = is_deploy_form(provided)
    holds_train = any('.branch_3x3.' in k for k in provided)
    if holds_deploy and not deploy:
        raise CheckpointError(
            'these RepVGG weights are in deploy (re-parameterized) form; '
            'build the backbone with deploy=True to load them')
    if holds_train and deploy:
        raise CheckpointError(
            'these RepVGG weights are in training (multi-branch) form; '
            'build the backbone with deploy=False, load them, then call '
            'switch_to_deploy()')
