"""What mmseg does around a model at test time, read from its config: the
test pipeline, and as the runtime's records its resize and the test mode
(:class:`~mmrepvgg.runtime.metadata.ResizeStep`,
:class:`~mmrepvgg.runtime.metadata.InferenceMode`).

A step of the test pipeline that the runtime does not reproduce is refused
at export, instead of giving other labels than mmseg's at run time.
"""
from ..errors import ConfigError
from ..runtime.metadata import INTERPOLATIONS, InferenceMode, ResizeStep

__all__ = ['test_transforms', 'test_resize', 'test_mode', 'slide_crop_size']

# Steps that change nothing the model sees.
_PASSIVE = ('LoadImageFromFile', 'LoadAnnotations', 'LoadImageFromNDArray',
            'PackSegInputs')


def test_transforms(cfg):
    """The config's test pipeline: its test dataset's, else
    ``test_pipeline``; None if it has neither."""
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    return dataset.get('pipeline') or cfg.get('test_pipeline')


def _pair(value):
    return [int(value)] * 2 if isinstance(value,
                                          int) else [int(v) for v in value]


def test_resize(cfg):
    """The test pipeline's resize, None if it has none.

    Raises:
        ConfigError: A step other than loading, one ``Resize`` to a scale
            with OpenCV, and packing.
    """
    resizes = []
    for transform in test_transforms(cfg) or []:
        kind = str(transform.get('type'))
        if kind.split('.')[-1] in _PASSIVE:
            continue
        options = {k: v for k, v in transform.items() if k != 'type'}
        known = {'scale', 'keep_ratio', 'interpolation', 'backend'}
        if (kind.split('.')[-1] != 'Resize' or set(options) - known
                or options.get('scale') is None
                or options.get('backend', 'cv2') != 'cv2' or options.get(
                    'interpolation', 'bilinear') not in INTERPOLATIONS):
            raise ConfigError(
                f'{cfg.filename}: its test pipeline step {transform} is not '
                'one the runtime reproduces (loading, Resize to a scale '
                'with OpenCV, PackSegInputs)')
        resizes.append(
            ResizeStep(
                _pair(options['scale']), bool(options.get('keep_ratio')),
                options.get('interpolation', 'bilinear')))
    if len(resizes) > 1:
        raise ConfigError(f'{cfg.filename}: its test pipeline resizes more '
                          'than once')
    return resizes[0] if resizes else None


def test_mode(cfg):
    """The model's test mode (``model.test_cfg``).

    Raises:
        ConfigError: A mode other than whole and slide.
    """
    test_cfg = (cfg.get('model') or {}).get('test_cfg') or {}
    mode = test_cfg.get('mode', 'whole')
    if mode == 'whole':
        return InferenceMode()
    if mode == 'slide':
        return InferenceMode('slide', _pair(test_cfg['crop_size']),
                             _pair(test_cfg['stride']))
    raise ConfigError(f'{cfg.filename}: its test mode {mode!r} is neither '
                      "'whole' nor 'slide'")


def slide_crop_size(cfg):
    """``(height, width)`` of the windows of a slide-mode config, which its
    model is exported at; None in whole mode."""
    mode = test_mode(cfg)
    return tuple(mode.crop_size) if mode.mode == 'slide' else None
