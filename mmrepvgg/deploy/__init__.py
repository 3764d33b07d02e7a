"""From a trained model to a deployed one.

One module per concept:

- :mod:`.convert`: whole-model conversion to the plain-conv form, and the
  check that it computes what the trained model did;
- :mod:`.compare`: comparing outputs (fp32 tolerances derived from the
  model's own float error, labels);
- :mod:`.exact`: a model's exact (float64) outputs, the reference;
- :mod:`.images`: reading and checking images, size limits, batches, the
  config's test pipeline, dataset images;
- :mod:`.loading`: models built offline with their checkpoint's weights,
  in deploy form, with their classes and palette;
- :mod:`.pair`: the verified deploy checkpoint and config;
- :mod:`.logits`: a segmentor as a function from images to logits;
- :mod:`.graph`: a segmentor as an ONNX graph, with its metadata;
- :mod:`.export`: the fp32 ONNX export, verified on the engines (int8 is
  :mod:`mmrepvgg.quantization`'s);
- :mod:`.test_settings`: what mmseg does around a model at test time, as
  the runtime's records;
- :mod:`.model_info`: writing an exported model's metadata (reading it
  and running the model are :mod:`mmrepvgg.runtime`'s);
- :mod:`.engines`: exported models evaluated by mmengine's Runner;
- :mod:`.folded_psp`: PSPNet's pyramid pooling folded, for inference;
- :mod:`.modules`: replacing modules, and float64 convolutions within
  memory.

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
