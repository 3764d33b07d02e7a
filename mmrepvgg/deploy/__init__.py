"""From a trained model to a deployed one, one module per concept (listed
in ``docs/design/layout.md``); int8 is :mod:`mmrepvgg.quantization`'s.

The names below are imported on first use, so that ``import mmrepvgg``
(which every training run does) loads no ONNX, engine or quantization
code.
"""
import importlib

_NAMES = dict(
    convert=['switch_to_deploy'],
    compare=['relative_error', 'Fp32Tolerance'],
    loading=['deploy_model', 'load_model'],
    pair=['ReparameterizeResult', 'deploy_config_path', 'reparameterize'],
    export=['ExportResult', 'ExportJob', 'ExportSettings', 'export_onnx'],
    model_info=['ExportedModelInfo'],
    engines=['EngineSettings', 'SegmentationEngine', 'EngineSegmentor'],
    folded_psp=['FoldedPSPHead', 'fold_psp_heads'])
_HOMES = {name: home for home, names in _NAMES.items() for name in names}
__all__ = list(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(
        importlib.import_module(f'.{_HOMES[name]}', __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
