"""tools/reparameterize.py turns trained checkpoints into deploy pairs that
mmseg and mmdet use unchanged, and refuses bad input without writing."""
import copy
import os
import os.path as osp
import sys

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

from mmrepvgg import fold_psp_heads, switch_to_deploy
from mmrepvgg.config import build_model, config_dicts, read_config
from mmrepvgg.deploy import deploy_config_path, deploy_model, reparameterize
from mmrepvgg.deploy.compare import Fp32Tolerance, relative_error
from mmrepvgg.deploy.convert import ConversionCheck, image_input, random_input
from mmrepvgg.deploy.images import TestPipeline
from mmrepvgg.deploy.loading import DEFAULT_CHECK_SIZE, load_model
from mmrepvgg.errors import CheckpointError, UsageError, VerificationError
from tests.helpers import (PSPNET_A0, REPO_ROOT, CarriesCode,
                           assert_converts_exactly, assert_fp32_close,
                           assert_labels_match, exact_seg_logits,
                           logged_metrics, output, randomize_batch_norms, run,
                           run_tool, run_tool_here)

RETINANET_A0 = osp.join(REPO_ROOT, 'configs', 'retinanet',
                        'retinanet_repvgg-a0_fpn_1x_coco.py')
A0_BLOCKS = 1 + 2 + 4 + 14 + 1  # stem and the four body stages


@pytest.fixture(scope='module')
def trained(trained_pspnet):
    """The shared toy PSPNet-RepVGG-A0 (SyncBN config): config, checkpoint
    and validation images."""
    return (trained_pspnet.config, trained_pspnet.checkpoint,
            trained_pspnet.val_images)


@pytest.fixture(scope='module')
def converted(trained, tmp_path_factory):
    """The trained checkpoint converted by the command line, with --img."""
    config, checkpoint, images = trained
    out = str(tmp_path_factory.mktemp('deploy') / 'pspnet_deploy.pth')
    result = run_tool('reparameterize.py', config, checkpoint, out, '--img',
                      *images)
    assert result.returncode == 0, output(result)
    return out, result


def _weights(path):
    return torch.load(path, weights_only=True)['state_dict']


@pytest.mark.numerics
def test_cli_writes_a_safe_deploy_pair(trained, converted):
    _, checkpoint, images = trained
    out, result = converted
    assert f'converted {A0_BLOCKS} blocks' in result.stdout
    assert f'on {1 + len(images)} input(s)' in result.stdout
    before, after = (
        int(n.replace(',', '')) for n in result.stdout.split('blocks: ')
        [1].split(' parameters')[0].split(' -> '))
    assert after < before

    # Plain torch, without mmrepvgg's allow-list, reads it weights-only.
    code = ('import torch; c = torch.load(%r, weights_only=True); '
            'print(sorted(c))' % out)
    loaded = run(sys.executable, '-c', code)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "['meta', 'state_dict']"

    deployed = torch.load(out, weights_only=True)
    source = torch.load(checkpoint)
    assert deployed['meta']['dataset_meta'] == source['meta']['dataset_meta']
    keys = list(deployed['state_dict'])
    assert not any('.branch_3x3.' in k or '.branch_norm.' in k for k in keys)
    fused = [k for k in keys if k.endswith('.branch_reparam.weight')]
    assert len(fused) == A0_BLOCKS

    cfg = Config.fromfile(deploy_config_path(out))
    assert cfg.model.backbone.deploy is True
    assert cfg.model.backbone.init_cfg is None
    repvgg_nodes = [
        node for node in config_dicts(cfg.to_dict())
        if node.get('type') == 'RepVGG'
    ]
    # The model's backbone, and the settings variable it was made from.
    assert len(repvgg_nodes) >= 2
    assert all(node['deploy'] is True for node in repvgg_nodes)
    assert 'Pretrained' not in cfg.pretty_text
    assert deployed['meta']['cfg'] == cfg.pretty_text


def test_syncbn_config_builds_and_converts(trained, converted):
    config, _, _ = trained
    model = build_model(Config.fromfile(config))
    assert isinstance(model.backbone.stem.branch_3x3.norm, nn.SyncBatchNorm)
    deployed = build_model(
        Config.fromfile(deploy_config_path(converted[0])), deploy=True)
    deployed.load_state_dict(_weights(converted[0]), strict=True)
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        for m in deployed.backbone.modules())


def _runner_test(config, checkpoint, work_dir, label_dir):
    cfg = Config.fromfile(config)
    cfg.work_dir = str(work_dir)
    cfg.load_from = checkpoint
    cfg.test_evaluator['output_dir'] = str(label_dir)
    return Runner.from_cfg(cfg).test()


def _tool_test(config, checkpoint, work_dir, label_dir):
    # mim test runs the pair too, in the demo's test.
    result = run_tool_here('test.py', config, checkpoint, '--work-dir',
                           work_dir, '--out', label_dir)
    assert result.returncode == 0, output(result)
    return logged_metrics(work_dir)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.integration
def test_the_deploy_pair_evaluates_as_the_trained_model(
        trained, converted, tmp_path):
    from mmseg.apis import inference_model, init_model
    config, checkpoint, images = trained
    out, _ = converted
    trained_metrics = _runner_test(config, checkpoint, tmp_path / 'train',
                                   tmp_path / 'train_labels')
    deploy_metrics = _tool_test(
        deploy_config_path(out), out, tmp_path / 'deploy',
        tmp_path / 'deploy_labels')
    names = sorted(os.listdir(tmp_path / 'train_labels'))
    assert len(names) == len(images)
    assert sorted(os.listdir(tmp_path / 'deploy_labels')) == names
    train_model = init_model(config, checkpoint, device='cpu')
    flips = 0
    for name, image in zip(names, sorted(images)):
        exact = exact_seg_logits(train_model, image)
        own = inference_model(train_model, image).seg_logits.data
        limit = Fp32Tolerance().limit(relative_error(own, exact))
        for labels in ('train_labels', 'deploy_labels'):
            flips += assert_labels_match(
                cv2.imread(
                    str(tmp_path / labels / name), cv2.IMREAD_UNCHANGED),
                exact, limit)
    if not flips:  # else near-ties moved a pixel's class, and the metrics
        for key in ('aAcc', 'mIoU', 'mAcc'):
            assert deploy_metrics[key] == trained_metrics[key], key


@pytest.mark.numerics
def test_inference_model_label_maps_are_identical(trained, converted):
    from mmseg.apis import inference_model, init_model
    config, checkpoint, images = trained
    out, _ = converted
    train_model = init_model(config, checkpoint, device='cpu')
    deploy_model = init_model(deploy_config_path(out), out, device='cpu')
    assert deploy_model.dataset_meta['classes'] == train_model.dataset_meta[
        'classes']
    # The deploy pair with its PSP head folded for faster inference.
    folded_model = copy.deepcopy(deploy_model)
    assert fold_psp_heads(folded_model) == 1
    for image in images:
        own = inference_model(train_model, image).seg_logits.data
        exact = exact_seg_logits(train_model, image)
        for model in (deploy_model, folded_model):
            check = assert_fp32_close(
                exact_seg_logits(model, image), own, exact)
            actual = inference_model(model, image)
            # Labels flip only where classes tie within what fp32 moves.
            arithmetic = relative_error(actual.seg_logits.data,
                                        exact_seg_logits(model, image))
            assert_labels_match(
                actual.pred_sem_seg.data[0], exact,
                max(check.limit,
                    Fp32Tolerance().limit(arithmetic)))


def test_ddp_checkpoint_with_optimizer_converts_to_the_same_weights(
        trained, converted, tmp_path):
    config, checkpoint, _ = trained
    state = torch.load(checkpoint)['state_dict']
    ddp = tmp_path / 'ddp.pth'
    torch.save(
        dict(
            state_dict={
                f'module.{k}': v
                for k, v in state.items()
            },
            optimizer=dict(state={}, param_groups=[dict(lr=0.01)])), ddp)
    out = tmp_path / 'deploy.pth'
    reparameterize(config, str(ddp), str(out))
    written = torch.load(out, weights_only=True)
    assert set(written) == {'meta', 'state_dict'}
    expected = _weights(converted[0])
    assert list(written['state_dict']) == list(expected)
    for key, value in expected.items():
        assert torch.equal(written['state_dict'][key], value), key


@pytest.mark.numerics
@pytest.mark.parametrize('half_dtype', [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_convert_exactly(trained, tmp_path,
                                                    half_dtype):
    config, checkpoint, _ = trained
    model = build_model(Config.fromfile(config))
    state = torch.load(checkpoint)['state_dict']
    norms = {
        key
        for key in state if isinstance(
            model.get_submodule(key.rsplit('.', 1)[0]),
            nn.modules.batchnorm._BatchNorm)
    }
    # Values that the half dtype holds exactly; converted in float32 they
    # are the reference.
    single = {
        k: v.to(half_dtype).float() if v.is_floating_point() else v
        for k, v in state.items()
    }
    half = {
        k: v.to(half_dtype) if v.is_floating_point() else v
        for k, v in single.items()
    }
    # Half-precision training in mmcv's style keeps the norms in float32.
    mixed = {k: single[k] if k in norms else v for k, v in half.items()}
    written = {}
    for name, weights in (('single', single), ('half', half), ('mixed',
                                                               mixed)):
        torch.save(dict(state_dict=weights), tmp_path / f'{name}.pth')
        result = reparameterize(config, str(tmp_path / f'{name}.pth'),
                                str(tmp_path / f'{name}_deploy.pth'))
        # Measured on the pair as written, read back.
        assert result.check.passed
        written[name] = _weights(tmp_path / f'{name}_deploy.pth')
    reference = written.pop('single')
    for name, weights in written.items():
        source = half if name == 'half' else mixed
        assert list(weights) == list(reference)
        for key, value in weights.items():
            # Tensors of the checkpoint keep their dtype; fused ones are
            # float32, as exact as from a float32 checkpoint.
            dtype = source[key].dtype if key in source else torch.float32
            assert value.dtype == dtype, (name, key)
            assert torch.equal(value, reference[key].to(dtype)), (name, key)


def _corrupt_one_block(model):
    switch_to_deploy(model)
    model.backbone.stage_3[5].branch_reparam.weight.data.mul_(1.01)


def _without_1x1_branches(model):
    for block in model.backbone.blocks():
        block.branch_1x1.conv.weight.data.zero_()
    switch_to_deploy(model)


def _with_norms_swapped(model):
    block = model.backbone.stage_3[5]
    norm_3x3, norm_1x1 = block.branch_3x3.norm, block.branch_1x1.norm
    block.branch_3x3.norm, block.branch_1x1.norm = norm_1x1, norm_3x3
    switch_to_deploy(model)


@pytest.mark.numerics
@pytest.mark.parametrize(
    'fault', [_corrupt_one_block, _without_1x1_branches, _with_norms_swapped])
def test_a_wrong_fold_is_refused_by_a_wide_margin(trained, fault):
    config, checkpoint, images = trained
    cfg = read_config(config)
    model = load_model(cfg, checkpoint).model
    check = ConversionCheck(model, [
        random_input(model, DEFAULT_CHECK_SIZE),
        image_input(TestPipeline(cfg), model, images[0])
    ])
    fault(model)
    comparison = check.compare(model)
    assert not comparison.passed
    # The limit is fp32's own error: a wrong fold is off by far more.
    assert comparison.margin >= 100, comparison.describe()


def test_failed_verification_writes_nothing(trained, tmp_path):
    config, checkpoint, _ = trained
    out = tmp_path / 'deploy.pth'
    with pytest.raises(
            VerificationError,
            match=r'differs from the trained one \(in float64 the deploy '
            r'model differs from the exact outputs by .*, where the trained '
            r'model in fp32 is off by .* \(limit .*\); in fp32 it is off by '
            r'.*\); nothing written'):
        reparameterize(
            config, checkpoint, str(out), convert=_corrupt_one_block)
    assert os.listdir(tmp_path) == []


def _truncated(tmp_path, checkpoint):
    path = tmp_path / 'truncated.pth'
    with open(checkpoint, 'rb') as f:
        data = f.read()
    path.write_bytes(data[:len(data) // 2])
    return path


def _not_a_checkpoint(tmp_path, checkpoint):
    path = tmp_path / 'notes.pth'
    path.write_text('not a checkpoint\n')
    return path


def _list_checkpoint(tmp_path, checkpoint):
    path = tmp_path / 'list.pth'
    torch.save([torch.ones(1)], path)
    return path


def _missing_and_unexpected(tmp_path, checkpoint):
    state = torch.load(checkpoint)['state_dict']
    del state['decode_head.conv_seg.weight']
    state['neck.extra.weight'] = torch.ones(1)
    path = tmp_path / 'mismatch.pth'
    torch.save(dict(state_dict=state), path)
    return path


@pytest.mark.parametrize(
    'make, message',
    [(lambda tmp_path, _: tmp_path / 'absent.pth', 'no such file'),
     (_truncated, 'truncated or corrupt'),
     (_not_a_checkpoint, 'not a readable checkpoint'),
     (_list_checkpoint, 'not a checkpoint'),
     (_missing_and_unexpected, 'missing keys decode_head.conv_seg.weight; '
      'unexpected keys neck.extra.weight')])
def test_bad_checkpoint_is_refused_and_nothing_written(trained, tmp_path, make,
                                                       message):
    config, checkpoint, _ = trained
    bad = make(tmp_path, checkpoint)
    before = set(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=message) as error:
        reparameterize(config, str(bad), str(tmp_path / 'deploy.pth'))
    assert '\n' not in str(error.value)
    assert set(os.listdir(tmp_path)) == before


def test_checkpoint_carrying_code_is_refused_and_never_runs(trained, tmp_path):
    config, _, _ = trained
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pth'
    torch.save(
        dict(state_dict={'w': torch.ones(1)}, x=CarriesCode(str(marker))),
        evil)
    result = run_tool_here('reparameterize.py', config, evil,
                           tmp_path / 'deploy.pth')
    assert result.returncode == 1
    assert result.stderr.startswith('error: ')
    assert 'refused' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ['evil.pth']


def test_config_of_another_architecture_is_named(trained, tmp_path):
    config, checkpoint, _ = trained
    other = tmp_path / 'a1.py'
    # A1 is A0 with wider early stages: same keys, other shapes.
    other.write_text(f'_base_ = {config!r}\n'
                     "model = dict(backbone=dict(arch='A1'), "
                     'auxiliary_head=dict(in_channels=256))\n')
    with pytest.raises(
            CheckpointError,
            match=r'does not match .*a1\.py: .*: shape of backbone\.stem\.'):
        reparameterize(str(other), checkpoint, str(tmp_path / 'deploy.pth'))
    assert sorted(os.listdir(tmp_path)) == ['a1.py']


def test_input_already_in_deploy_form_is_refused(trained, converted, tmp_path):
    config, _, _ = trained
    out, _ = converted
    for cfg in (config, deploy_config_path(out)):
        with pytest.raises(CheckpointError, match='already in deploy form'):
            reparameterize(cfg, out, str(tmp_path / 'again.pth'))
    assert os.listdir(tmp_path) == []


def _digest(path):
    with open(path, 'rb') as f:
        return f.read()


def test_output_that_is_an_input_is_refused(trained, tmp_path):
    config, checkpoint, _ = trained
    # A copy of the config beside the checkpoint's output name.
    local_config = tmp_path / 'model.py'
    local_config.write_text(open(config).read())
    link = tmp_path / 'link.pth'
    link.symlink_to(checkpoint)
    inputs = {p: _digest(p) for p in (checkpoint, local_config)}
    for out in (checkpoint, link, tmp_path / 'model.pth'):
        with pytest.raises(UsageError, match='is an input'):
            reparameterize(str(local_config), checkpoint, str(out), force=True)
    assert {p: _digest(p) for p in inputs} == inputs
    assert sorted(os.listdir(tmp_path)) == ['link.pth', 'model.py']


def test_existing_output_needs_force(trained, tmp_path):
    config, checkpoint, _ = trained
    out = tmp_path / 'deploy.pth'
    out.write_bytes(b'keep me')
    result = run_tool_here('reparameterize.py', config, checkpoint, out)
    assert result.returncode == 1
    assert result.stderr.strip() == (f'error: {out}: already exists; pass '
                                     '--force to overwrite it')
    assert out.read_bytes() == b'keep me'
    assert not out.with_suffix('.py').exists()

    reparameterize(config, checkpoint, str(out), force=True)
    assert '.branch_reparam.' in ''.join(_weights(out))
    assert out.with_suffix('.py').is_file()


@pytest.mark.numerics
def test_retinanet_detections_match_after_conversion(tmp_path):
    from mmdet.apis import inference_detector, init_detector
    config = tmp_path / 'retinanet.py'
    # A small test resize keeps inference quick on a CPU.
    config.write_text(
        f'_base_ = {RETINANET_A0!r}\n'
        'test_pipeline = [\n'
        "    dict(type='LoadImageFromFile'),\n"
        "    dict(type='Resize', scale=(256, 192), keep_ratio=True),\n"
        "    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', "
        "'ori_shape', 'img_shape', 'scale_factor')),\n"
        ']\n'
        'test_dataloader = dict(dataset=dict(pipeline=test_pipeline))\n'
        # The ten best differ in score by far more than rounding could
        # change: their order is stable.
        'model = dict(test_cfg=dict(max_per_img=10))\n')
    model = randomize_batch_norms(build_model(Config.fromfile(config)))
    # A focal-loss prior and spread class weights: a few clear detections.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        classifier = model.bbox_head.retina_cls
        classifier.bias.fill_(-4.6)
        classifier.weight.copy_(
            torch.randn(classifier.weight.shape, generator=generator) * 0.03)
    checkpoint = tmp_path / 'retinanet.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    out = tmp_path / 'retinanet_deploy.pth'

    result = reparameterize(str(config), str(checkpoint), str(out))

    assert result.converted == A0_BLOCKS
    meta = torch.load(out, weights_only=True)['meta']
    assert len(meta['dataset_meta']['classes']) == 80
    image = np.random.default_rng(0).integers(
        0, 256, (120, 160, 3), dtype=np.uint8)
    trained_model = init_detector(str(config), str(checkpoint), device='cpu')
    deployed = init_detector(
        deploy_config_path(str(out)), str(out), device='cpu')
    expected = inference_detector(trained_model, image).pred_instances
    actual = inference_detector(deployed, image).pred_instances
    assert len(expected) == 10
    assert torch.equal(actual.labels, expected.labels)
    # Every score and box the heads compute, as exactly as fp32 allows.
    inputs = torch.rand(1, 3, 96, 128, generator=generator)
    assert_converts_exactly(
        deployed,
        trained_model, [inputs],
        run=lambda m, x: m(x, mode='tensor'))


@pytest.mark.numerics
def test_a_segmentor_of_a_users_own_block_converts(tmp_path, users_modules):
    config = tmp_path / 'user_block.py'
    config.write_text(
        f'_base_ = {PSPNET_A0!r}\n'
        "custom_imports = dict(imports=['mmrepvgg', 'user_block'])\n"
        "model = dict(backbone=dict(block_cfg=dict(type='UserRepBlock')))\n")
    cfg = read_config(str(config))
    model = randomize_batch_norms(build_model(cfg, deploy=False))
    checkpoint = tmp_path / 'user_block.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    out = tmp_path / 'deploy.pth'

    result = reparameterize(str(config), str(checkpoint), str(out))

    assert result.converted == A0_BLOCKS and result.check.passed
    assert any('.fused.' in k for k in torch.load(out)['state_dict'])
    # Its deploy weights are known by the blocks they fit, not by name.
    deployed = deploy_model(
        read_config(deploy_config_path(str(out))), str(out))
    assert deployed.deploy_form and deployed.conversion is None
    inputs = torch.rand(1, 3, 64, 128)
    assert_converts_exactly(
        deployed.model,
        model.eval(), [inputs],
        run=lambda m, x: m(x, mode='tensor'))
    with pytest.raises(CheckpointError, match='already in deploy form'):
        reparameterize(str(config), str(out), str(tmp_path / 'again.pth'))
