"""The deploy tools under hostile input: no input is ever an output, a
foreign or edited model is refused in one line, sizes are checked before
any work, and an interrupt is one line at any moment.

The tools run in this process through their command lines
(:func:`helpers.run_tool_here`), except where a signal must reach a
process of their own.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import onnx
import pytest
import torch

from tests.helpers import (PSPNET_A0, REPO_ROOT, TOY_SIZE, assert_refused,
                           output, run_tool_here, snapshot)

pytestmark = pytest.mark.integration

# --- no input is ever an output, with or without --force ------------------


@pytest.fixture
def folder(tmp_path, trained_pspnet):
    """A folder with a copy of the toy checkpoint and an image."""
    shutil.copy(trained_pspnet.checkpoint, tmp_path / 'model.pth')
    shutil.copy(trained_pspnet.val_images[0], tmp_path / 'x.png')
    return tmp_path


@pytest.mark.parametrize('link', ['same path', 'symbolic link', 'hard link'])
@pytest.mark.parametrize('tool', ['export.py', 'reparameterize.py'])
def test_an_image_to_check_on_is_never_the_output(trained_pspnet, folder, tool,
                                                  link):
    out = folder / 'x.png'
    if link == 'symbolic link':
        (folder / 'out.png').symlink_to(out)
        out = folder / 'out.png'
    elif link == 'hard link':
        os.link(out, folder / 'out.png')
        out = folder / 'out.png'
    before = snapshot(folder)
    result = run_tool_here(tool, trained_pspnet.config, folder / 'model.pth',
                           out, '--img', folder / 'x.png', '--force')
    assert_refused(result, 'is an input', folder, before)


def test_infer_never_writes_over_an_image(exported, folder):
    model, _ = exported
    # pred/x.png would be written for pred/x.png itself.
    (folder / 'pred').mkdir()
    shutil.copy(folder / 'x.png', folder / 'pred' / 'x.png')
    before = snapshot(folder)
    result = run_tool_here('infer.py', model, folder / 'pred' / 'x.png',
                           '--out-dir', folder, '--force')
    assert_refused(result, 'pred/x.png: is an input', folder, before)


def test_convert_pretrained_never_writes_over_its_source(folder):
    (folder / 'dst.pth').symlink_to(folder / 'model.pth')
    before = snapshot(folder)
    result = run_tool_here('convert_pretrained.py', folder / 'model.pth',
                           folder / 'dst.pth', '--force')
    assert_refused(result, 'is an input', folder, before)


@pytest.mark.parametrize('option', ['--json', '--chart'])
def test_benchmark_never_writes_over_its_inputs(trained_pspnet, folder,
                                                option):
    before = snapshot(folder)
    result = run_tool_here('benchmark.py', trained_pspnet.config,
                           '--checkpoint', folder / 'model.pth', '--image',
                           folder / 'x.png', option, folder / 'x.png',
                           '--force')
    assert_refused(result, 'x.png: is an input', folder, before)


# --- a foreign or edited model: one line, from every tool that reads it ---


def _rename_input(model):
    for node in model.graph.node:
        node.input[:] = ['pixels' if i == 'images' else i for i in node.input]
    model.graph.input[0].name = 'pixels'


def _unknown_operator(model):
    conv = next(n for n in model.graph.node if n.op_type == 'Conv')
    conv.op_type = 'NoSuchConv'


def _set(**props):

    def edit(model):
        values = {p.key: p.value for p in model.metadata_props}
        values.update(props)
        values = {k: v for k, v in values.items() if v is not None}
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, values)

    return edit


def _palette(colour):
    return json.dumps([colour] * 19)


FOREIGN = {
    'input renamed': (_rename_input, "take one rank-4 float32 'images'"),
    'unknown operator': (_unknown_operator, 'cannot run it'),
    'classes not JSON': (_set(classes='["road", '), 'classes is not JSON'),
    'metadata nested 100000 deep':
    (_set(agreement='[' * 100000 + ']' * 100000), 'agreement is not JSON'),
    'metadata nested 20 deep':
    (_set(calibration='[' * 20 + ']' * 20), 'nested deeper than 16 levels'),
    'palette colours of 4 values':
    (_set(palette=_palette([1, 2, 3, 4])), 'not an RGB colour'),
    'palette value 300':
    (_set(palette=_palette([300, 0, 0])), 'not an RGB colour'),
    'palette value -1': (_set(palette=_palette([-1, 0, 0])),
                         'not an RGB colour'),
    'input_size unlike the graph': (_set(input_size='[32, 64]'),
                                    'its graph takes inputs of 64x128, its '
                                    'metadata says 32x64'),
    'classes unlike the logits': (_set(classes='["road"]', palette='[]'),
                                  'gives 19 logits per pixel for 1 classes'),
}


def _edited(exported, tmp_path, edit):
    model = onnx.load(str(exported[0]))
    edit(model)
    path = tmp_path / 'edited.onnx'
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize('case', sorted(FOREIGN))
def test_infer_refuses_a_foreign_model_in_one_line(trained_pspnet, exported,
                                                   tmp_path, case):
    edit, message = FOREIGN[case]
    model = _edited(exported, tmp_path, edit)
    before = snapshot(tmp_path)
    result = run_tool_here('infer.py', model, trained_pspnet.val_images[0],
                           '--out-dir', tmp_path / 'out')
    assert_refused(result, message, tmp_path, before)


@pytest.mark.parametrize(
    'case', ['input renamed', 'unknown operator', 'classes not JSON'])
@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_test_refuses_a_foreign_model_in_one_line(trained_pspnet, exported,
                                                  tmp_path, case, backend):
    edit, message = FOREIGN[case]
    model = _edited(exported, tmp_path, edit)
    before = snapshot(tmp_path)
    result = run_tool_here('test.py', trained_pspnet.config, model,
                           '--backend', backend, '--work-dir',
                           tmp_path / 'work')
    # No logs of a run that never started either.
    assert_refused(result, message, tmp_path, before)


def test_infer_without_a_palette_says_so(trained_pspnet, exported, tmp_path):
    model = _edited(exported, tmp_path, _set(palette=None))
    result = run_tool_here('infer.py', model, trained_pspnet.val_images[0],
                           '--out-dir', tmp_path / 'out')
    assert_refused(result, 'no palette to colour the labels with')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('arguments, message', [
    (['--threads', '-1'], "threads must be 0 (the engine's choice) or more"),
    (['--backend', 'openvino', '--threads', '-1'], 'threads must be 0'),
    (['--backend', 'onnxruntime', '--precision', 'bf16'], 'fp32 only'),
    (['--opacity', '2'], 'opacity must be between 0 and 1'),
])
def test_infer_checks_its_arguments_first(trained_pspnet, exported, tmp_path,
                                          arguments, message):
    result = run_tool_here('infer.py', exported[0],
                           trained_pspnet.val_images[0], '--out-dir',
                           tmp_path / 'out', *arguments)
    assert_refused(result, message)
    assert not (tmp_path / 'out').exists()


# --- checkpoint metadata and configs --------------------------------------


@pytest.mark.parametrize('dataset_meta, message', [
    (dict(classes=7), 'its classes are not a list of'),
    (dict(classes=['road'] * 19, palette=['red'] * 19), 'not an RGB colour'),
    (dict(classes=['road'] * 19, palette=[[0, 0, 0]] * 3),
     'does not hold one colour for each of its 19 classes'),
])
def test_export_checks_the_checkpoints_metadata(trained_pspnet, tmp_path,
                                                dataset_meta, message):
    checkpoint = torch.load(trained_pspnet.checkpoint)
    checkpoint['meta']['dataset_meta'] = dataset_meta
    torch.save(checkpoint, tmp_path / 'edited.pth')
    before = snapshot(tmp_path)
    result = run_tool_here('export.py', trained_pspnet.config,
                           tmp_path / 'edited.pth', tmp_path / 'out.onnx',
                           '--shape', *TOY_SIZE)
    assert_refused(result, message, tmp_path, before)


def _derived_config(tmp_path, base, text):
    config = tmp_path / 'derived.py'
    config.write_text(f'_base_ = {base!r}\n{text}')
    return config


@pytest.mark.parametrize(
    'arguments, message',
    [
        (['--dynamic', '--shape', '4', '4'], 'two integers of at least 11'),
        (['--dynamic', '--shape', '64', '20000'], 'at most 16384'),
        (['--shape', '20000', '20000'], 'larger than the 4,194,304 pixels'),
        # The metadata reader's limit, not one the reader refuses after export.
        (['--shape', '7', '9'], 'two integers of at least 8'),
        (['--shape', '8', '16385'], 'at most 16384'),
        # An int8 option without --int8 is a contradiction.
        (['--min-agreement', '-1'], '--min-agreement given without --int8'),
        (['--int8-scheme', 'bogus'], '--int8-scheme given without --int8'),
        (['--int8-report'], '--int8-report given without --int8'),
        # Options of a QAT checkpoint's check, for another checkpoint.
        (['--int8', '--qat-eval-num', '2'], 'is not a QAT checkpoint'),
    ])
def test_export_checks_sizes_before_any_work(trained_pspnet, tmp_path,
                                             monkeypatch, arguments, message):
    # Before the checkpoint is read: loading is not even reached.
    import mmrepvgg.deploy.export as export
    monkeypatch.setattr(export, 'deploy_model', None)
    result = run_tool_here('export.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, tmp_path / 'out.onnx',
                           *arguments)
    assert_refused(result, message)
    assert os.listdir(tmp_path) == []


def test_export_without_a_test_pipeline_needs_a_shape(trained_pspnet,
                                                      tmp_path):
    config = _derived_config(
        tmp_path, trained_pspnet.config, 'test_pipeline = []\n'
        'test_dataloader = dict(dataset=dict(pipeline=[]))\n')
    before = snapshot(tmp_path)
    result = run_tool_here('export.py', config, trained_pspnet.checkpoint,
                           tmp_path / 'out.onnx')
    assert_refused(result, 'has no test pipeline', tmp_path, before)


def test_test_without_a_test_dataloader_says_so(trained_pspnet, tmp_path):
    config = _derived_config(tmp_path, trained_pspnet.config,
                             'test_dataloader = None\n')
    before = snapshot(tmp_path)
    result = run_tool_here('test.py', config, trained_pspnet.checkpoint,
                           '--work-dir', tmp_path / 'work')
    assert_refused(result, 'has no test_dataloader and test_evaluator',
                   tmp_path, before)


# --- sizes and memory -----------------------------------------------------


def test_images_larger_than_read_at_most_are_refused_from_their_header(
        exported, tmp_path):
    # A 9000x9000 PNG of zeros is a few hundred kB; decoded, 243 MB.
    huge = tmp_path / 'huge.png'
    cv2.imwrite(str(huge), np.zeros((9000, 9000), np.uint8))
    result = run_tool_here('infer.py', exported[0], huge, '--out-dir',
                           tmp_path / 'out')
    assert_refused(result, 'larger than the 67,108,864 pixels read at most')
    assert not (tmp_path / 'out').exists()


# --- interrupts, full disks, logging, valid input -------------------------


@pytest.mark.slow
@pytest.mark.parametrize('delay', [1.0, 5.0])
def test_ctrl_c_is_one_line_at_any_moment(trained_pspnet, tmp_path, delay):
    process = subprocess.Popen([
        sys.executable,
        os.path.join(REPO_ROOT, 'tools', 'export.py'), trained_pspnet.config,
        trained_pspnet.checkpoint,
        str(tmp_path / 'out.onnx'), '--shape', *map(str, TOY_SIZE)
    ],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE,
                               text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    code = process.wait()
    stderr = process.stderr.read()
    if code == 0:  # it finished first
        assert os.listdir(tmp_path) == ['out.onnx']
    else:
        assert code == 130 and stderr.splitlines() == ['interrupted'], stderr
        assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_full_temporary_folder_while_quantizing_is_one_line(
        trained_pspnet, tmp_path, monkeypatch):
    import onnxruntime.quantization

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(onnxruntime.quantization, 'quantize_static', full)
    result = run_tool_here('export.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, tmp_path / 'out.onnx',
                           '--shape', *TOY_SIZE, '--int8', '--calib-num', 1,
                           '--eval-num', 1)
    assert_refused(result, 'No space left on device')
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_int8_calibrates_through_a_dataset_wrapper_quietly(
        trained_pspnet, tmp_path, capfd):
    config = _derived_config(
        tmp_path, trained_pspnet.config,
        'train_dataloader = dict(dataset=dict(_delete_=True, '
        "type='RepeatDataset', times=3, dataset=_base_.train_dataloader."
        'dataset))\n')
    result = run_tool_here('export.py', config, trained_pspnet.checkpoint,
                           tmp_path / 'int8.onnx', '--shape', *TOY_SIZE,
                           '--int8', '--calib-num', 2, '--eval-num', 1,
                           '--min-agreement', 0)
    assert result.returncode == 0, output(result)
    assert 'calibrated on 2 training image(s)' in result.stdout
    # Nothing reached the terminal's stderr, ONNX Runtime's log included.
    assert capfd.readouterr().err == ''


def test_an_out_name_of_255_bytes_is_written(trained_pspnet, tmp_path):
    out = tmp_path / ('x' * 251 + '.pth')
    result = run_tool_here('reparameterize.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, out)
    assert result.returncode == 0, output(result)
    assert sorted(
        os.listdir(tmp_path)) == [f'{out.stem}.pth', f'{out.stem}.py']


@pytest.mark.parametrize('arguments, message', [
    (['--threads', '-1'], 'threads >= 0'),
    (['--json', 'same.json', '--chart', 'same.json'], 'name the same file'),
    (['--rounds', '0'], 'rounds must be >= 1'),
])
def test_benchmark_checks_its_arguments_first(tmp_path, arguments, message,
                                              monkeypatch):
    # The module that tools/benchmark.py imports, as a script does.
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, 'tools'))
    import apps.benchmark
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(apps.benchmark, 'run_benchmark', None)
    result = run_tool_here('benchmark.py', PSPNET_A0, *arguments)
    assert_refused(result, message)
    assert os.listdir(tmp_path) == []
