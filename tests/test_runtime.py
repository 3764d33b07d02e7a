"""The torch-free runtime predicts what mmseg's ``inference_model`` predicts
on the deploy model, in whole mode with a resizing test pipeline and in
slide mode, and ``mmrepvgg-infer`` reads and writes what a deploy user
expects."""
import json
import os
import os.path as osp
import sys

import cv2
import numpy as np
import pytest
import torch

from mmrepvgg.deploy import reparameterize
from mmrepvgg.deploy.export import ExportJob, ExportSettings, export_onnx
from mmrepvgg.deploy.pair import deploy_config_path
from mmrepvgg.errors import MetadataError
from mmrepvgg.runtime import ExportedModelInfo, Segmenter, read_model
from mmrepvgg.runtime.metadata import InferenceMode, ResizeStep
from mmrepvgg.runtime.segmenter import resize_logits, resized_size
from tests.helpers import (assert_refused, logged_metrics, output,
                           run_tool_here, snapshot)

# What must agree with mmseg: near-ties of fp32 logits may move a pixel.
MIN_AGREEMENT = 0.9999
# Another size and aspect than the toy images' 64x128.
OTHER_SIZES = ((50, 170), (90, 70))
RESIZE = "dict(type='Resize', scale=(160, 80), keep_ratio=True)"
# The test pipeline resizes, as Cityscapes' does; the labels are read
# after it, so they stay at the image's size.
RESIZING_CONFIG = '''_base_ = {base!r}
test_pipeline = [
    dict(type='LoadImageFromFile'),
    {resize},
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
'''
# Windows that overlap, and do not divide the toy images.
SLIDING_CONFIG = '''_base_ = {base!r}
model = dict(
    test_cfg=dict(mode='slide', crop_size=(48, 96), stride=(32, 64)))
'''


@pytest.fixture(scope='module')
def deploy_pair(trained_pspnet, tmp_path_factory):
    """The toy PSPNet's deploy checkpoint and config."""
    out = tmp_path_factory.mktemp('deploy') / 'deploy.pth'
    reparameterize(trained_pspnet.config, trained_pspnet.checkpoint, str(out))
    return deploy_config_path(str(out)), str(out)


def _derived(deploy_pair, folder, text):
    config = folder / 'config.py'
    config.write_text(text.format(base=deploy_pair[0], resize=RESIZE))
    return str(config)


@pytest.fixture(scope='module')
def resizing(deploy_pair, tmp_path_factory):
    """A deploy config whose test pipeline resizes, and its model exported
    to take any size."""
    folder = tmp_path_factory.mktemp('resizing')
    config = _derived(deploy_pair, folder, RESIZING_CONFIG)
    out = str(folder / 'model.onnx')
    export_onnx(
        ExportJob.checked(config, deploy_pair[1], out,
                          ExportSettings((80, 160), dynamic=True)))
    return config, out


@pytest.fixture(scope='module')
def sliding(deploy_pair, tmp_path_factory):
    """A slide-mode deploy config, and its model exported at its default
    size."""
    folder = tmp_path_factory.mktemp('sliding')
    config = _derived(deploy_pair, folder, SLIDING_CONFIG)
    out = str(folder / 'model.onnx')
    export_onnx(ExportJob.checked(config, deploy_pair[1], out))
    return config, out


@pytest.fixture(scope='module')
def images(trained_pspnet, tmp_path_factory):
    """The toy val images, and images of other sizes and aspects."""
    folder = tmp_path_factory.mktemp('other_sizes')
    rng = np.random.default_rng(0)
    paths = list(trained_pspnet.val_images)
    for height, width in OTHER_SIZES:
        # A val image stretched, with noise: a scene, not noise alone.
        image = cv2.resize(
            cv2.imread(paths[0]), (width, height),
            interpolation=cv2.INTER_LINEAR)
        noise = rng.normal(0, 8, image.shape)
        path = str(folder / f'other_{height}x{width}.png')
        cv2.imwrite(path, np.clip(image + noise, 0, 255).astype(np.uint8))
        paths.append(path)
    return paths


def _mmseg_labels(config, checkpoint, paths):
    from mmseg.apis import inference_model, init_model
    model = init_model(config, checkpoint, device='cpu')
    return [
        inference_model(model, path).pred_sem_seg.data[0].numpy()
        for path in paths
    ]


def _assert_agree(segmenter, expected, paths):
    for path, labels in zip(paths, expected):
        actual = segmenter(path)
        assert actual.shape == labels.shape, path
        agreement = np.mean(actual == labels)
        assert agreement >= MIN_AGREEMENT, (path, agreement)


@pytest.mark.slow
@pytest.mark.numerics
def test_whole_mode_with_a_resizing_pipeline_predicts_what_mmseg_does(
        deploy_pair, resizing, images):
    config, model = resizing
    segmenter = Segmenter(model)
    assert segmenter.info.resize == ResizeStep([160, 80], True, 'bilinear')
    assert segmenter.info.test_mode == InferenceMode()
    expected = _mmseg_labels(config, deploy_pair[1], images)
    _assert_agree(segmenter, expected, images)


@pytest.mark.slow
@pytest.mark.numerics
def test_slide_mode_predicts_what_mmseg_does(deploy_pair, sliding, images):
    config, model = sliding
    segmenter = Segmenter(model, batch=3)
    # Exported at its windows' size, slid over images of any size.
    assert segmenter.info.input_size == [48, 96]
    assert segmenter.info.test_mode == InferenceMode('slide', [48, 96],
                                                     [32, 64])
    tall = [p for p in images if '90x70' not in p]  # narrower than a window
    expected = _mmseg_labels(config, deploy_pair[1], tall)
    _assert_agree(segmenter, expected, tall)


@pytest.mark.slow
@pytest.mark.integration
def test_int8_labels_are_those_tools_test_computes(trained_pspnet, tmp_path):
    from mmengine.config import Config
    from mmseg.apis import inference_model

    from mmrepvgg.deploy.engines import EngineSegmentor
    out = tmp_path / 'int8.onnx'
    result = run_tool_here('export.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, out, '--shape', 64, 128,
                           '--int8', '--calib-num', 4, '--eval-num', 2,
                           '--min-agreement', 0.5)
    assert result.returncode == 0, output(result)
    assert read_model(str(out)).info.precision == 'int8'
    # tools/test.py runs the Runner's test pipeline and EngineSegmentor:
    # inference_model runs the same on one image.
    engine_model = EngineSegmentor(str(out))
    engine_model.cfg = Config.fromfile(trained_pspnet.config)
    segmenter = Segmenter(str(out))
    for path in trained_pspnet.val_images:
        expected = inference_model(engine_model, path).pred_sem_seg.data[0]
        assert np.array_equal(segmenter(path), expected.numpy())


def _miou(pred_dir, data_root):
    from mmseg.evaluation import IoUMetric
    metric = IoUMetric()
    results = []
    for path in sorted(os.listdir(pred_dir)):
        stem = path.replace('_leftImg8bit.png', '')
        gt = cv2.imread(
            osp.join(data_root, 'gtFine', 'val', 'toytown',
                     f'{stem}_gtFine_labelTrainIds.png'), cv2.IMREAD_UNCHANGED)
        pred = cv2.imread(osp.join(pred_dir, path), cv2.IMREAD_UNCHANGED)
        results.append(
            metric.intersect_and_union(
                torch.from_numpy(pred), torch.from_numpy(gt), 19, 255))
    totals = [sum(r[i] for r in results) for i in range(4)]
    return 100 * np.nanmean(
        IoUMetric.total_area_to_metrics(*totals, ['mIoU'])['IoU'])


@pytest.mark.slow
@pytest.mark.integration
def test_miou_of_the_pred_pngs_is_tools_tests(trained_pspnet, resizing,
                                              tmp_path):
    config, model = resizing
    result = run_tool_here('infer.py', model, *trained_pspnet.val_images,
                           '--out-dir', tmp_path / 'out')
    assert result.returncode == 0, output(result)
    tested = run_tool_here('test.py', config, model, '--work-dir',
                           tmp_path / 'work')
    assert tested.returncode == 0, output(tested)
    expected = logged_metrics(tmp_path / 'work')['mIoU']
    miou = _miou(tmp_path / 'out' / 'pred', trained_pspnet.data_root)
    assert abs(miou - expected) <= 0.01, (miou, expected)


def test_resize_sizes_are_mmcvs():
    import mmcv
    rng = np.random.default_rng(0)
    for keep_ratio in (True, False):
        step = ResizeStep([2048, 1024], keep_ratio)
        for _ in range(50):
            size = tuple(int(s) for s in rng.integers(1, 3000, 2))
            image = np.zeros((*size, 1), np.uint8)
            if keep_ratio:
                expected = mmcv.imrescale(image, (2048, 1024)).shape[:2]
            else:
                expected = mmcv.imresize(image, (2048, 1024)).shape[:2]
            assert resized_size(size, step) == expected


@pytest.mark.parametrize('align_corners', [False, True])
def test_logits_are_resized_as_mmseg_resizes_them(align_corners):
    from mmseg.models.utils import resize
    logits = np.random.default_rng(0).normal(size=(5, 13,
                                                   29)).astype(np.float32)
    for size in ((64, 100), (7, 11), (13, 29), (1, 40)):
        expected = resize(
            torch.from_numpy(logits)[None],
            size,
            mode='bilinear',
            align_corners=align_corners)[0].numpy()
        bands = list(resize_logits(logits, size, align_corners, rows=5))
        actual = np.concatenate([band for _, band in bands], 1)
        assert [start for start, _ in bands] == list(range(0, size[0], 5)) \
            or size == (13, 29)
        assert np.allclose(actual, expected, rtol=0, atol=1e-5)


def test_old_model_files_read_with_the_defaults():
    props = dict(
        classes='["road"]',
        palette='[]',
        align_corners='false',
        input_size='null')
    info = ExportedModelInfo.from_props(props)
    assert info.resize is None and info.test_mode == InferenceMode()
    info = ExportedModelInfo(['road'], [], None, False,
                             ResizeStep([2048, 1024], True),
                             InferenceMode('slide', [512, 1024], [341, 683]))
    assert ExportedModelInfo.from_props(info.to_props()) == info


@pytest.mark.parametrize('props, message', [
    (dict(resize='{"scale": [0, 5], "keep_ratio": true, '
          '"interpolation": "bilinear"}'), 'resize'),
    (dict(resize='{"scale": [5, 5], "keep_ratio": true, '
          '"interpolation": "cubic"}'), 'resize'),
    (dict(resize='[2048, 1024]'), 'resize'),
    (dict(test_mode='{"mode": "slide"}'), 'test_mode'),
    (dict(test_mode='{"mode": "slide", "crop_size": [8, 8], '
          '"stride": [0, 8]}'), 'test_mode'),
    (dict(test_mode='{"mode": "tiles"}'), 'test_mode'),
    (dict(test_mode='null'), 'test_mode'),
])
def test_malformed_inference_metadata_is_refused(props, message):
    base = dict(
        classes='["road"]',
        palette='[]',
        align_corners='false',
        input_size='null')
    with pytest.raises(MetadataError, match=f'its metadata {message} is'):
        ExportedModelInfo.from_props(dict(base, **props))


# What the runtime may import: the standard library aside, these.
_RUNTIME_IMPORTS = ('numpy', 'cv2', 'onnxruntime', 'openvino', 'mmrepvgg')
_RUNTIME_PACKAGE_MODULES = ('mmrepvgg', 'mmrepvgg.errors', 'mmrepvgg.version',
                            'mmrepvgg.logs', 'mmrepvgg.cli', 'mmrepvgg.fileio')


def _imports(module):
    """The modules that ``module`` imports at its top level (not inside
    functions), relative ones resolved."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec(module)
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    package = module if spec.origin.endswith('__init__.py') else \
        module.rpartition('.')[0]
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) -
                                            node.level + 1]
                base = '.'.join(parent + ([base] if base else []))
            yield base


def test_the_runtime_imports_nothing_of_the_stack():
    # Every module the runtime reaches at import time, and what they
    # import; the torch-free Python of test_runtime_venv.py runs them.
    seen, todo = set(), ['mmrepvgg.runtime', 'mmrepvgg.runtime.infer']
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in _imports(module):
            top = imported.split('.')[0]
            if top in sys.stdlib_module_names:
                continue
            assert top in _RUNTIME_IMPORTS, (module, imported)
            if top == 'mmrepvgg':
                assert imported.startswith('mmrepvgg.runtime') or (
                    imported in _RUNTIME_PACKAGE_MODULES), (module, imported)
                todo.append(imported)
    assert 'mmrepvgg.runtime.engine' in seen and 'mmrepvgg.fileio' in seen


@pytest.fixture
def inputs(trained_pspnet, tmp_path):
    """The val images in a folder with a subfolder, and a list of them."""
    folder = tmp_path / 'in'
    (folder / 'sub').mkdir(parents=True)
    paths = []
    for index, path in enumerate(trained_pspnet.val_images):
        target = folder / ('sub' if index % 2 else '') / f'img{index}.png'
        target.write_bytes(open(path, 'rb').read())
        paths.append(target)
    (folder / 'notes.txt').write_text('not an image')
    (tmp_path / 'list.txt').write_text('in/img0.png\nin/sub/img1.png\n')
    return folder


def _written(out):
    return sorted(
        osp.relpath(osp.join(root, name), out)
        for root, _, names in os.walk(out) for name in names)


@pytest.mark.integration
@pytest.mark.parametrize('arguments, names', [
    (['in'], ['img0', 'img2']),
    (['in', '--recursive'], ['img0', 'img1', 'img2', 'img3']),
    (['in/sub/*.png'], ['img1', 'img3']),
    (['@list.txt'], ['img0', 'img1']),
])
def test_infer_takes_folders_globs_and_lists(exported, inputs, arguments,
                                             names, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    result = run_tool_here('infer.py', exported[0], *arguments, '--out-dir',
                           'out', '--batch', 2)
    assert result.returncode == 0, output(result)
    assert _written('out') == sorted(f'{kind}/{name}.png' for name in names
                                     for kind in ('pred', 'vis'))
    speed = result.stdout.strip().splitlines()[-1]
    assert speed.startswith('Speed: ') and 'ms inference' in speed
    assert 'images/s' in speed
    segmenter = Segmenter(str(exported[0]))
    for name in names:
        path = next(inputs.rglob(f'{name}.png'))
        labels = cv2.imread(f'out/pred/{name}.png', cv2.IMREAD_UNCHANGED)
        assert np.array_equal(labels, segmenter(str(path)))


@pytest.mark.integration
def test_infer_writes_label_frames_and_an_overlay_video(
        exported, trained_pspnet, tmp_path):
    video = str(tmp_path / 'clip.mp4')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 5,
                             (128, 64))
    for path in trained_pspnet.val_images:
        writer.write(cv2.imread(path))
    writer.release()
    result = run_tool_here('infer.py', exported[0], video, '--out-dir',
                           tmp_path / 'out')
    assert result.returncode == 0, output(result)
    frames = len(trained_pspnet.val_images)
    assert _written(
        tmp_path /
        'out') == sorted([f'pred/clip_{i:06d}.png'
                          for i in range(frames)] + ['vis/clip.mp4'])
    capture = cv2.VideoCapture(str(tmp_path / 'out' / 'vis' / 'clip.mp4'))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == frames


@pytest.mark.parametrize('arguments, message', [
    (['--threads', '1000'], 'threads must be at most'),
    (['--batch', '0'], 'batch must be at least 1'),
    (['--opacity', '2'], 'opacity must be between 0 and 1'),
    (['missing/*.png'], 'matches no images or videos'),
    (['@missing.txt'], 'cannot read the list'),
    (['in/notes.txt'], 'neither an image'),
])
def test_infer_refuses_bad_arguments_in_one_line(exported, inputs, arguments,
                                                 message, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    before = snapshot(inputs.parent)
    result = run_tool_here('infer.py', exported[0], 'in/img0.png', *arguments,
                           '--out-dir', 'out')
    assert_refused(result, message, inputs.parent, before)


def test_infer_never_overwrites_without_force(exported, inputs, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    first = run_tool_here('infer.py', exported[0], 'in', '--out-dir', 'out')
    assert first.returncode == 0, output(first)
    before = snapshot(inputs.parent)
    again = run_tool_here('infer.py', exported[0], 'in', '--out-dir', 'out')
    assert_refused(again, 'already exists; pass --force', inputs.parent,
                   before)
    forced = run_tool_here('infer.py', exported[0], 'in', '--out-dir', 'out',
                           '--force')
    assert forced.returncode == 0, output(forced)


def test_a_cut_model_or_one_with_external_data_is_refused(exported, tmp_path):
    import onnx

    from mmrepvgg.errors import UsageError
    data = open(exported[0], 'rb').read()
    cut = tmp_path / 'cut.onnx'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(UsageError, match='not a readable ONNX model'):
        read_model(str(cut))
    external = tmp_path / 'external.onnx'
    onnx.save_model(
        onnx.load_from_string(data),
        str(external),
        save_as_external_data=True,
        size_threshold=0)
    with pytest.raises(UsageError, match='keeps weights in external files'):
        read_model(str(external))


def test_segmenter_is_five_lines_of_python(exported, trained_pspnet):
    image = cv2.imread(trained_pspnet.val_images[0])
    labels = Segmenter(str(exported[0]))(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
    info = read_model(str(exported[0])).info
    assert json.loads(json.dumps(info.palette)) == info.palette
