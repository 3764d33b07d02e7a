"""``{config-table}``: the table of the configs in ``configs/``, generated at
build time: each config is read with mmengine and its model built on
PyTorch's meta device (shapes only, no memory, no weights) in training and
deploy form to count its parameters.

The deploy form's measured speed-up comes from
``docs/_data/deploy_speedups.json``, which names the benchmark page each
figure is from; a figure for a config that does not exist, or from a page
that does not, is an error.
"""
import glob
import json
import os.path as osp
from dataclasses import dataclass
from typing import Optional

from sphinx.util.docutils import SphinxDirective

DOCS = osp.dirname(osp.dirname(osp.abspath(__file__)))
ROOT = osp.dirname(DOCS)
SPEEDUPS = osp.join(DOCS, '_data', 'deploy_speedups.json')
# What a decode head or a detector is called in papers.
MODEL_NAMES = dict(
    PSPHead='PSPNet',
    ASPPHead='DeepLabV3',
    DepthwiseSeparableASPPHead='DeepLabV3+',
    RetinaNet='RetinaNet',
    FasterRCNN='Faster R-CNN',
    MaskRCNN='Mask R-CNN')
DATASETS = dict(CityscapesDataset='Cityscapes', CocoDataset='COCO')


@dataclass
class Speedup:
    """A measured speed-up of the deploy form over the training form."""
    value: str
    page: str


@dataclass
class ConfigRow:
    """What the table says about one config."""
    path: str
    model: str
    dataset: str
    backbone: str
    input_size: str
    params: int
    deploy_params: int
    speedup: Optional[Speedup] = None


def shipped_configs():
    """Every config under ``configs/``, bases excluded, as paths relative
    to the repository."""
    found = glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
    return sorted(
        osp.relpath(p, ROOT) for p in found
        if osp.basename(osp.dirname(p)) != '_base_')


def _backbone(backbone):
    block = (backbone.get('block_cfg') or {}).get('type', 'RepVGGBlock')
    name = block[:-len('Block')] if block.endswith('Block') else block
    # The paper's "fast" setting dilates only some blocks of a stage.
    fast = any(
        isinstance(d, (list, tuple)) for d in backbone.get('dilations', ()))
    return f"{name}-{backbone['arch']}" + (' fast' if fast else '')


def _input_size(cfg):
    if cfg.get('crop_size'):
        return 'crop {}x{}'.format(*cfg.crop_size)
    for step in cfg.train_pipeline:
        if step['type'] == 'Resize':
            return 'resize {}x{}'.format(*step['scale'])
    raise ValueError(f'{cfg.filename}: neither crop_size nor a Resize step')


def _count_params(cfg, deploy):
    import torch

    from mmrepvgg.config import build_model
    with torch.device('meta'):
        model = build_model(cfg, deploy=deploy)
    return sum(p.numel() for p in model.parameters())


def read_row(path):
    """The table row of one config."""
    from mmrepvgg.config import read_config
    cfg = read_config(osp.join(ROOT, path))
    model = cfg.model
    head = model.get('decode_head', {}).get('type')
    return ConfigRow(
        path=path,
        model=MODEL_NAMES.get(head or model.type, head or model.type),
        dataset=DATASETS.get(cfg.dataset_type, cfg.dataset_type),
        backbone=_backbone(model.backbone),
        input_size=_input_size(cfg),
        params=_count_params(cfg, deploy=False),
        deploy_params=_count_params(cfg, deploy=True))


def read_speedups(configs):
    """The measured speed-ups by config, checked against ``configs``."""
    with open(SPEEDUPS) as f:
        speedups = json.load(f)
    unknown = sorted(set(speedups) - set(configs))
    if unknown:
        raise ValueError(f'{SPEEDUPS} names configs that do not exist: '
                         f'{", ".join(unknown)}')
    return {path: Speedup(**value) for path, value in speedups.items()}


def table_lines(rows):
    """The rows as a Markdown table (the directive is used in MyST pages)."""
    lines = [
        '| Config | Model | Backbone | Input | Params (train / deploy) '
        '| Deploy speed-up |', '|---|---|---|---|---|---|'
    ]
    for row in rows:
        speedup = '—'
        if row.speedup:
            speedup = (f'{row.speedup.value} '
                       f'({{doc}}`measured </{row.speedup.page}>`)')
        lines.append(f'| `{row.path}` | {row.model}, {row.dataset} '
                     f'| {row.backbone} | {row.input_size} '
                     f'| {row.params / 1e6:.1f}M / '
                     f'{row.deploy_params / 1e6:.1f}M | {speedup} |')
    return lines


class ConfigTable(SphinxDirective):
    """The table of shipped configs."""

    def run(self):
        configs = shipped_configs()
        speedups = read_speedups(configs)
        rows = []
        for path in configs:
            self.env.note_dependency(osp.join(ROOT, path))
            row = read_row(path)
            row.speedup = speedups.get(path)
            rows.append(row)
        self.env.note_dependency(SPEEDUPS)
        return self.parse_text_to_nodes('\n'.join(table_lines(rows)))


def setup(app):
    app.add_directive('config-table', ConfigTable)
    return dict(parallel_read_safe=True, parallel_write_safe=True)
