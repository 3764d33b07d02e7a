"""From a trained model to a deployed one, one module per concept (listed
in ``docs/design/layout.md``); int8 is :mod:`mmrepvgg.quantization`'s.

The names below are imported on first use, so that ``import mmrepvgg``
(which every training run does) loads no ONNX, engine or quantization
code.
"""
import importlib

_HOMES = dict(
    switch_to_deploy='convert',
    relative_error='compare',
    Fp32Tolerance='compare',
    deploy_model='loading',
    load_model='loading',
    ReparameterizeResult='pair',
    deploy_config_path='pair',
    reparameterize='pair',
    ExportResult='export',
    ExportJob='export',
    ExportSettings='export',
    export_onnx='export',
    ExportedModelInfo='model_info',
    EngineSettings='engines',
    SegmentationEngine='engines',
    EngineSegmentor='engines',
    FoldedPSPHead='folded_psp',
    fold_psp_heads='folded_psp',
)
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
