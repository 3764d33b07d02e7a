"""From a trained model to a deployed one.

One module per concept:

- :mod:`.convert`: whole-model conversion to the plain-conv form, and the
  check that it computes what the trained model did;
- :mod:`.compare`: comparing outputs (fp32 tolerances derived from the
  model's own float error, labels, agreement);
- :mod:`.images`: reading and checking images, size limits, batches, the
  config's test pipeline, dataset images;
- :mod:`.loading`: models built offline with their checkpoint's weights,
  in deploy form, with their classes and palette;
- :mod:`.pair`: the verified deploy checkpoint and config;
- :mod:`.logits`: a segmentor as a function from images to logits;
- :mod:`.graph`: a segmentor as an ONNX graph, with its metadata;
- :mod:`.export`: ONNX export (fp32, int8, or a QAT checkpoint's int8),
  verified on the engines;
- :mod:`.model_info`: writing an exported model's metadata (reading it
  and running the model are :mod:`mmrepvgg.runtime`'s);
- :mod:`.quantize`: calibrated int8;
- :mod:`.mixed_precision`: each conv's int8 sensitivity, and the convs
  kept in fp32;
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
    ExportSettings='export',
    export_onnx='export',
    ExportedModelInfo='model_info',
    Int8Settings='quantize',
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
