"""The benchmark library and tool at tiny sizes.

These tests check what the benchmark reports, never how fast anything is:
speed figures come from running the tool itself.
"""
import json
import os.path as osp

import pytest

from mmrepvgg.config import read_config
from mmrepvgg.deploy.engines import bf16_available
from mmrepvgg.errors import ConfigError, UsageError
from tests.helpers import PSPNET_A0, REPO_ROOT, output, run_tool_here
from tools.apps.benchmark import PARTS, BenchmarkSettings, run_benchmark
from tools.apps.report import (BenchmarkResult, format_report, plot_chart,
                               write_json)

PSPNET_R18 = 'mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py'
SIZE = (64, 128)
SHAPE = (1, 3, *SIZE)
# Only a segmentor has a head to fold.
FOLDED = 'deploy+fold_psp'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Forms that the engines add to every segmentor (bf16 where the CPU has
# bf16 units).
ENGINE_FORMS = ('onnxruntime fp32', 'openvino fp32') + (
    ('openvino bf16', ) if bf16_available() else ())


@pytest.fixture(scope='module')
def result():
    """Two PSPNets timed on every engine: 30 s on 2 cores, so the tests
    that read it are slow."""
    return run_benchmark(
        BenchmarkSettings(
            PSPNET_A0,
            references=[PSPNET_R18],
            size=SIZE,
            rounds=3,
            warmup=1,
            threads=2,
            fold_psp=True,
            backends=('torch', 'onnxruntime', 'openvino'),
            precisions=('fp32', 'bf16')),
        log=lambda line: None)


@pytest.mark.slow
def test_every_model_is_timed_in_every_round(result):
    forms = {(t.part, t.form) for t in result.timings}
    assert forms == {(part, form)
                     for part in PARTS
                     for form in ('train', 'deploy', 'reference')
                     } | {('segmentor', form)
                          for form in (FOLDED, *ENGINE_FORMS)}
    # ONNX Runtime has no bf16 on CPUs; both models run on each engine.
    assert sum(t.form in ENGINE_FORMS
               for t in result.timings) == 2 * len(ENGINE_FORMS)
    for timing in result.timings:
        assert len(timing.times_s) == 3
        assert timing.min_s <= timing.median_s <= timing.max_s
        assert timing.spread == pytest.approx(
            (timing.max_s - timing.min_s) / timing.median_s)
    assert result.settings['shape'] == list(SHAPE)
    assert result.settings['threads'] == 2


@pytest.mark.slow
def test_speedups_are_median_per_round_ratios(result):
    times = {(t.part, t.name): t.times_s for t in result.timings}
    pairs = set()
    for ratio in result.ratios:
        candidate = times[ratio.part, ratio.candidate]
        baseline = times[ratio.part, ratio.baseline]
        per_round = sorted(b / c for c, b in zip(candidate, baseline))
        assert ratio.speedup == pytest.approx(per_round[1])
        assert ratio.speedup_min == pytest.approx(per_round[0])
        assert ratio.speedup_max == pytest.approx(per_round[-1])
        pairs.add((ratio.part, ratio.candidate, ratio.baseline))
    a0, r18 = 'pspnet_repvgg-a0-d8', 'pspnet_r18-d8'
    for part in PARTS:
        assert (part, f'{a0} (deploy)', f'{a0} (train)') in pairs
        assert (part, f'{a0} (deploy)', f'{r18} (reference)') in pairs
    assert ('segmentor', f'{a0} ({FOLDED})', f'{a0} (deploy)') in pairs
    for form in ENGINE_FORMS:
        # Each engine form over its own PyTorch model, and ours over the
        # reference on the same engine.
        assert ('segmentor', f'{a0} ({form})', f'{a0} (deploy)') in pairs
        assert ('segmentor', f'{r18} ({form})', f'{r18} (reference)') in pairs
        assert ('segmentor', f'{a0} ({form})', f'{r18} ({form})') in pairs
    assert len(pairs) == 2 * len(PARTS) + 1 + 3 * len(ENGINE_FORMS)


@pytest.mark.slow
@pytest.mark.numerics
def test_deploy_and_folded_deploy_predict_the_same(result):
    checks = {(c.part, c.candidate): c for c in result.checks}
    assert len(checks) == len(PARTS) + 1 + 2 * len(ENGINE_FORMS)
    forms = [(part, 'deploy') for part in PARTS] + [('segmentor', FOLDED)]
    for part, form in forms:
        check = checks[part, f'pspnet_repvgg-a0-d8 ({form})']
        # Labels may flip only where two classes tie within the limit.
        assert check.exact, check
        assert check.max_rel_error <= check.limit
        if part == 'segmentor':
            assert check.label_mismatches is not None


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize('model', ['pspnet_repvgg-a0-d8', 'pspnet_r18-d8'])
def test_engines_are_checked_against_their_pytorch_model(result, model):
    checks = {c.candidate: c for c in result.checks}
    pytorch = 'deploy' if 'repvgg' in model else 'reference'
    for form in ENGINE_FORMS:
        check = checks[f'{model} ({form})']
        assert check.reference == f'{model} ({pytorch})'
        if form.endswith('fp32'):
            assert check.exact, check
        else:
            # bf16 trades exactness for speed (where the CPU has bf16
            # units); most labels survive.
            assert 0.9 < check.label_agreement <= 1, check


@pytest.mark.slow
@pytest.mark.integration
def test_int8_engines_are_calibrated_timed_and_checked(trained_pspnet):
    int8 = run_benchmark(
        BenchmarkSettings(
            trained_pspnet.config,
            checkpoint=trained_pspnet.checkpoint,
            size=SIZE,
            parts=('segmentor', ),
            rounds=1,
            warmup=1,
            backends=('torch', 'onnxruntime', 'openvino'),
            precisions=('int8', ),
            calib_num=2),
        log=lambda line: None)
    forms = [t.form for t in int8.timings if t.part == 'segmentor']
    assert forms.count('onnxruntime int8') == forms.count('openvino int8') == 1
    # One 3x3 conv in fp32 and int8 on each engine: the engines' ceiling.
    convs = sorted(t.form for t in int8.timings if t.part == 'conv')
    assert convs == [
        'onnxruntime fp32', 'onnxruntime int8', 'openvino fp32',
        'openvino int8'
    ]
    # Without the segmentor in fp32 no share of the ceiling is reported.
    assert int8.int8_ceilings == []
    checks = {c.candidate.split(' (')[1][:-1]: c for c in int8.checks}
    for form in ('onnxruntime int8', 'openvino int8'):
        assert checks[form].reference.endswith('(deploy)')
        # Quantization moves logits far more than fp32 rounding would;
        # most labels survive (96.4% of this toy model's when measured).
        assert checks[form].max_rel_error > checks[form].limit
        assert 0.9 < checks[form].label_agreement <= 1, checks[form]


@pytest.mark.slow
def test_report_json_and_chart(result, tmp_path):
    report = format_report(result)
    for timing in result.timings:
        assert timing.name in report
    assert 'same fp32 predictions' in report
    write_json(result.to_dict(), str(tmp_path / 'bench.json'))
    with open(tmp_path / 'bench.json') as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result.to_dict()))
    # What the demo reports from the JSON the tool writes.
    assert format_report(BenchmarkResult.from_dict(saved)) == report
    plot_chart(result, str(tmp_path / 'bench.png'))
    png = (tmp_path / 'bench.png').read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


@pytest.mark.integration
def test_tool_writes_json_and_chart(tmp_path):
    out = tmp_path / 'bench.json'
    result = run_tool_here('benchmark.py', PSPNET_A0, '--size', 64, 128,
                           '--parts', 'backbone', '--rounds', 1, '--warmup', 0,
                           '--json', out, '--chart', tmp_path / 'bench.png')
    assert result.returncode == 0, output(result)
    assert 'backbone: pspnet_repvgg-a0-d8 (deploy) over' in result.stdout
    with open(out) as f:
        saved = json.load(f)
    assert saved['settings']['shape'] == [1, 3, 64, 128]
    assert [t['form'] for t in saved['timings']] == ['train', 'deploy']
    assert (tmp_path / 'bench.png').read_bytes().startswith(PNG_SIGNATURE)

    again = run_tool_here('benchmark.py', PSPNET_A0, '--json', out)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f'error: {out}: already exists; pass --force to overwrite it'
    ]


def test_tool_refuses_a_missing_config(tmp_path):
    result = run_tool_here('benchmark.py', tmp_path / 'nope.py')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: {tmp_path / "nope.py"}: no such config file'
    ]


def test_unknown_configs_and_engine_forms_are_refused(tmp_path):
    with pytest.raises(ConfigError, match='no such config file'):
        read_config(str(tmp_path / 'nope.py'))
    with pytest.raises(ConfigError, match='nopackage is not installed'):
        read_config('nopackage::pspnet/nope.py')
    with pytest.raises(ConfigError, match='nope.py'):
        read_config('mmseg::pspnet/nope.py')
    with pytest.raises(UsageError, match='no backend asked for runs it'):
        BenchmarkSettings(
            PSPNET_A0,
            precisions=('bf16', ),
            backends=('torch', 'onnxruntime')).check()
    BenchmarkSettings(PSPNET_A0, fold_psp=True).check()


def test_tool_refuses_to_fold_a_head_that_is_not_psp():
    config = osp.join(
        REPO_ROOT, 'configs', 'deeplabv3',
        'deeplabv3_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
    result = run_tool_here('benchmark.py', config, '--fold-psp')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: --fold-psp: the decode head of {config} is ASPPHead, not '
        'PSPHead'
    ]
