"""Loading and conversion hold under hostile files, full disks, half
precision and races: one line on stderr, exit status 1, nothing written or
changed, and no process crash."""
import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import cv2
import numpy as np
import pytest
import torch

from mmrepvgg.checkpoint import checkpoint_meta, load_checkpoint
from mmrepvgg.deploy import deploy_config_path, reparameterize
from mmrepvgg.errors import CheckpointError, UsageError, VerificationError
from mmrepvgg.fileio import write_files
from tests.helpers import (PSPNET_A0, REPO_ROOT, CarriesCode, assert_refused,
                           output, run, run_tool_here, snapshot)

MULTIARRAY = getattr(np, '_core', None) or np.core
RECONSTRUCT = MULTIARRAY.multiarray._reconstruct


class Reduces:
    """Pickles as ``function(*args)`` followed by ``state``, if given."""

    def __init__(self, function, args, state=None):
        self.reduced = (function, args) + ((state, ) if state else ())

    def __reduce__(self):
        return self.reduced


def dtype_with_state(spec, state):
    """A pickled numpy dtype whose state step sets ``state``."""
    return Reduces(np.dtype, (spec, False, True), state)


def array_with_state(shape, dtype, data, reconstruct_shape=(0, )):
    """A pickled numpy array built as numpy pickles them."""
    return Reduces(RECONSTRUCT, (np.ndarray, reconstruct_shape, b'b'),
                   (1, shape, dtype, False, data))


POINTER = b'\x10\x00\x00\x00\x00\x00\x00\x00'
# Each builds an object array whose elements are raw addresses from the
# file, or otherwise asks numpy for memory or objects it must not give.
CRAFTED = {
    'ndarray called on an object dtype':
    Reduces(np.ndarray, ((1, ), np.dtype('O8'), POINTER)),
    'ndarray called on a dtype name':
    Reduces(np.ndarray, ((1, ), 'O', POINTER)),
    'object dtype fed to _reconstruct':
    array_with_state((1, ), np.dtype('O8'), POINTER),
    'object dtype rebuilt with flags 0':
    array_with_state((1, ),
                     Reduces(np.dtypes.ObjectDType, (),
                             (3, '|', None, None, None, -1, -1, 0)), POINTER),
    'structured dtype holding an object':
    array_with_state((1, ), np.dtype([('a', 'O')]), POINTER),
    'void dtype':
    array_with_state((1, ), np.dtype('V8'), POINTER),
    'a 2**45-byte array from 8 bytes':
    array_with_state((2**42, ), np.dtype('f8'), POINTER),
}

# Loads each file given in a fresh Python, after importing mmrepvgg, and
# prints what became of it.
LOAD_EACH = """
import sys, mmrepvgg, torch
for path in sys.argv[1:]:
    try:
        torch.load(path)
        print('loaded')
    except Exception as error:
        print(type(error).__name__)
"""


def test_plain_torch_load_after_import_refuses_unsafe_numpy_data(tmp_path):
    paths = []
    for index, name in enumerate(sorted(CRAFTED)):
        paths.append(tmp_path / f'crafted{index}.pth')
        torch.save(
            dict(meta=dict(hub=CRAFTED[name]), state_dict={}), paths[-1])
        with pytest.raises(CheckpointError, match='refused|not a readable'):
            load_checkpoint(str(paths[-1]))
    loaded = run(sys.executable, '-c', LOAD_EACH, *paths)
    # Refused with an exception each, never a crash (a segfault would end
    # the process with 139).
    assert loaded.returncode == 0, output(loaded)
    assert all(
        outcome in ('UnpicklingError', 'ValueError')
        for outcome in loaded.stdout.split()), loaded.stdout
    assert len(loaded.stdout.split()) == len(CRAFTED)


def test_array_sizes_come_from_the_bytes_in_the_file(tmp_path):
    # numpy's _reconstruct would allocate 2**45 bytes for this shape; the
    # array's state, with its bytes, sets the size instead.
    path = tmp_path / 'huge.pth'
    torch.save(
        dict(x=Reduces(RECONSTRUCT, (np.ndarray, (2**42, ), b'd'))), path)
    assert torch.load(path)['x'].size == 0


def test_a_float_dtype_state_claiming_objects_is_ignored(tmp_path):
    # numpy would take the flags of a copied dtype and treat the floats
    # below as object pointers; the shared float64 dtype ignores them.
    flagged = dtype_with_state('f8', (3, '<', None, None, None, -1, -1, 63))
    path = tmp_path / 'flagged.pth'
    torch.save(dict(x=array_with_state((1, ), flagged, POINTER)), path)
    array = torch.load(path)['x']
    assert array.dtype == np.float64 and not array.dtype.hasobject
    assert array.tolist() == [np.frombuffer(POINTER, np.float64)[0]]
    assert not np.dtype('f8').hasobject


def test_numbers_from_numpy_load_as_numpy_and_pickle_back_plainly():
    buffer = io.BytesIO()
    data = dict(
        array=np.arange(3.0), flags=np.array([True]), scalar=np.float32(2))
    torch.save(data, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()))
    assert loaded['array'].tolist() == [0.0, 1.0, 2.0]
    assert loaded['scalar'] == np.float32(2) and loaded['flags'].all()
    # Saved again, the arrays are plain numpy arrays: torch's safe loader
    # reads them back without mmrepvgg's stand-ins being named in the file.
    again = io.BytesIO()
    torch.save(loaded, again)
    assert b'mmrepvgg' not in again.getvalue()


def _zip_with_pickle_replaced(original, marker, replacement):
    """A torch checkpoint file with ``marker``'s pickled bytes in its
    data.pkl swapped for ``replacement``."""
    source = zipfile.ZipFile(io.BytesIO(original))
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith('data.pkl'):
                pickled = b'X' + len(marker).to_bytes(4, 'little') + marker
                assert pickled in data
                data = data.replace(pickled, replacement)
            target.writestr(name, data)
    return out.getvalue()


def _nested_meta_checkpoint(path, state_dict):
    # A tuple nested 200,000 deep: EMPTY_TUPLE, then TUPLE1 again and again
    # (torch.save itself could not pickle it).
    buffer = io.BytesIO()
    torch.save(dict(meta=dict(deep='NESTED'), state_dict=state_dict), buffer)
    path.write_bytes(
        _zip_with_pickle_replaced(buffer.getvalue(), b'NESTED',
                                  b')' + b'\x85' * 200_000))
    return path


@pytest.mark.parametrize('meta, message', [
    ('a string', 'its meta is a str, not a dict'),
    (7, 'its meta is a int, not a dict'),
    ({
        1: 'x'
    }, 'its meta has keys that are not strings'),
])
def test_malformed_meta_is_refused(meta, message):
    with pytest.raises(CheckpointError, match=message):
        checkpoint_meta(dict(meta=meta), 'ckpt')


# --- the command line: one line, exit 1, nothing written ------------------


def _trained_state(trained_pspnet):
    return torch.load(trained_pspnet.checkpoint)['state_dict']


def _assert_refused(result, message, folder, before):
    assert_refused(result, message)
    assert sorted(os.listdir(folder)) == before


def _bad_checkpoint(kind, path, trained_pspnet):
    state = _trained_state(trained_pspnet)
    if kind == 'meta is a string':
        torch.save(dict(meta='text', state_dict=state), path)
    elif kind == 'meta is an int':
        torch.save(dict(meta=3, state_dict=state), path)
    elif kind == 'keys are ints':
        torch.save(
            dict(state_dict={
                i: v
                for i, v in enumerate(state.values())
            }), path)
    elif kind == 'meta nested 200,000 deep':
        _nested_meta_checkpoint(path, state)
    elif kind == 'a 2**45-byte array':
        torch.save(
            dict(
                meta=dict(x=CRAFTED['a 2**45-byte array from 8 bytes']),
                state_dict=state), path)
    return path


@pytest.mark.integration
@pytest.mark.parametrize('kind, message', [
    ('meta is a string', 'its meta is a str, not a dict'),
    ('meta is an int', 'its meta is a int, not a dict'),
    ('keys are ints', 'holds no weights'),
    ('meta nested 200,000 deep', 'nested deeper than 32 levels'),
    ('a 2**45-byte array', 'not a readable checkpoint'),
])
def test_reparameterize_refuses_malformed_checkpoints(trained_pspnet, tmp_path,
                                                      kind, message):
    bad = _bad_checkpoint(kind, tmp_path / 'bad.pth', trained_pspnet)
    before = sorted(os.listdir(tmp_path))
    result = run_tool_here('reparameterize.py', trained_pspnet.config, bad,
                           tmp_path / 'deploy.pth')
    _assert_refused(result, message, tmp_path, before)


def _image_files(tmp_path):
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    corrupt = tmp_path / 'corrupt.png'
    ok, png = cv2.imencode('.png', np.zeros((16, 16, 3), np.uint8))
    corrupt.write_bytes(png.tobytes()[:40])
    huge = tmp_path / 'huge.png'
    cv2.imwrite(str(huge), np.zeros((8000, 8000), np.uint8))
    return dict(empty=empty, corrupt=corrupt, huge=huge)


@pytest.mark.integration
@pytest.mark.parametrize('image, message', [
    ('empty', 'not a readable image'),
    ('corrupt', 'not a readable image'),
    ('huge', 'the test pipeline makes it a 8000x8000 input, larger than the '
     '4,194,304 pixels a model is run on at most'),
])
def test_reparameterize_refuses_bad_images(trained_pspnet, tmp_path, image,
                                           message):
    path = _image_files(tmp_path)[image]
    before = sorted(os.listdir(tmp_path))
    result = run_tool_here('reparameterize.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, tmp_path / 'deploy.pth',
                           '--img', path)
    _assert_refused(result, message, tmp_path, before)


@pytest.mark.integration
@pytest.mark.parametrize('arguments, message', [
    (['--check-size', '0', '0'], 'an input size is two integers of at least'),
    (['--check-size', '-4', '8'], 'an input size is two integers of at least'),
    (['--check-size', '4000', '4000'], 'larger than the 4,194,304 pixels'),
    (['--tolerance-factor', '0'], 'a tolerance factor is at least 1'),
    (['--tolerance-floor', '-1'], 'a floor at least 0'),
])
def test_reparameterize_refuses_bad_arguments(trained_pspnet, tmp_path,
                                              arguments, message):
    result = run_tool_here('reparameterize.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, tmp_path / 'deploy.pth',
                           *arguments)
    _assert_refused(result, message, tmp_path, [])


@pytest.mark.integration
@pytest.mark.parametrize('out, message', [
    ('cfg.py/out.pth', 'is not a directory'),
    ('folder/', 'is a directory, not a file'),
])
def test_reparameterize_refuses_outputs_that_cannot_be_files(
        trained_pspnet, tmp_path, out, message):
    (tmp_path / 'cfg.py').write_text('x = 1\n')
    before = sorted(os.listdir(tmp_path))
    result = run_tool_here('reparameterize.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, f'{tmp_path}/{out}')
    _assert_refused(result, message, tmp_path, before)


@pytest.mark.integration
def test_a_config_without_a_model_is_refused(trained_pspnet, tmp_path):
    config = tmp_path / 'no_model.py'
    config.write_text('x = 1\n')
    result = run_tool_here('reparameterize.py', config,
                           trained_pspnet.checkpoint, tmp_path / 'deploy.pth')
    _assert_refused(result, 'has no model to build', tmp_path, ['no_model.py'])


@pytest.mark.integration
def test_train_refuses_a_config_with_a_syntax_error(tmp_path):
    config = tmp_path / 'broken.py'
    config.write_text('model = dict(\n')
    result = run_tool_here('train.py', config, '--work-dir', tmp_path / 'work')
    _assert_refused(result, 'not a readable config', tmp_path, ['broken.py'])


@pytest.mark.integration
@pytest.mark.parametrize('kind, message', [
    ('random', 'not a readable checkpoint'),
    ('truncated', 'truncated or corrupt'),
    ('code', 'refused'),
])
def test_test_refuses_bad_checkpoints(trained_pspnet, tmp_path, kind, message):
    bad = tmp_path / 'bad.pth'
    marker = tmp_path / 'code-ran'
    if kind == 'random':
        bad.write_bytes(os.urandom(4096))
    elif kind == 'truncated':
        data = open(trained_pspnet.checkpoint, 'rb').read()
        bad.write_bytes(data[:len(data) // 3])
    else:
        torch.save(dict(state_dict={}, x=CarriesCode(str(marker))), bad)
    before = sorted(os.listdir(tmp_path))
    result = run_tool_here('test.py', trained_pspnet.config, bad, '--work-dir',
                           tmp_path / 'work')
    _assert_refused(result, message, tmp_path, before)
    assert not marker.exists()


# --- half precision: the verified pair is the written pair ---------------


def _with_norm(state, prefix, weight, variance):
    state = dict(state)
    state[prefix + 'weight'] = torch.full_like(state[prefix + 'weight'],
                                               weight)
    state[prefix + 'running_var'] = torch.full_like(
        state[prefix + 'running_var'], variance)
    return state


@pytest.mark.numerics
@pytest.mark.slow
def test_fp16_gains_that_overflow_fp16_when_fused_convert_exactly(
        trained_pspnet, tmp_path):
    # Fused in float16 this kernel would be infinite: 60000 / sqrt(1e-5)
    # times the conv weights.
    state = _with_norm(
        _trained_state(trained_pspnet), 'backbone.stage_4.0.branch_3x3.norm.',
        60000.0, 6e-8)
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in state.items()
    }
    checkpoint = tmp_path / 'fp16.pth'
    torch.save(dict(state_dict=state), checkpoint)
    out = tmp_path / 'deploy.pth'
    result = reparameterize(trained_pspnet.config, str(checkpoint), str(out))
    assert result.check.passed
    fused = torch.load(
        out)['state_dict']['backbone.stage_4.0.branch_reparam.weight']
    assert fused.dtype == torch.float32 and fused.isfinite().all()
    assert fused.abs().max() > torch.finfo(torch.float16).max


def test_fused_weights_that_overflow_float32_are_refused(
        trained_pspnet, tmp_path):
    state = _with_norm(
        _trained_state(trained_pspnet), 'backbone.stage_4.0.branch_1x1.norm.',
        3e38, 0.0)
    checkpoint = tmp_path / 'huge_gain.pth'
    torch.save(dict(state_dict=state), checkpoint)
    with pytest.raises(
            VerificationError,
            match=r'the fused backbone\.stage_4\.0\.branch_reparam\.weight '
            r'is not finite'):
        reparameterize(trained_pspnet.config, str(checkpoint),
                       str(tmp_path / 'deploy.pth'))
    assert sorted(os.listdir(tmp_path)) == ['huge_gain.pth']


# --- the pair: both new files or the old state ---------------------------


def _pair(tmp_path):
    out = tmp_path / 'deploy.pth'
    return out, tmp_path / 'deploy.py'


def _fail_on(monkeypatch, name, when, error):
    real = getattr(os, name)

    def failing(*args, **kwargs):
        if when(*args):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


def test_a_full_disk_while_writing_the_pair_writes_nothing(
        tmp_path, monkeypatch):
    out, config = _pair(tmp_path)
    calls = []
    _fail_on(monkeypatch, 'fsync',
             lambda fd: calls.append(fd) or len(calls) == 2,
             OSError(errno.ENOSPC, 'No space left on device'))
    with pytest.raises(UsageError, match='cannot write .*No space left'):
        write_files({str(out): b'weights', str(config): b'config'})
    assert os.listdir(tmp_path) == []


def test_a_failed_replace_with_force_keeps_the_old_pair(tmp_path, monkeypatch):
    out, config = _pair(tmp_path)
    out.write_bytes(b'old weights')
    config.write_bytes(b'old config')
    _fail_on(monkeypatch, 'replace',
             lambda source, target: str(target) == str(config),
             OSError(errno.EIO, 'Input/output error', str(config)))
    with pytest.raises(UsageError, match='Input/output error'):
        write_files({
            str(out): b'new weights',
            str(config): b'new config'
        },
                    force=True)
    assert out.read_bytes() == b'old weights'
    assert config.read_bytes() == b'old config'
    assert sorted(os.listdir(tmp_path)) == ['deploy.pth', 'deploy.py']


def test_an_interrupt_while_placing_the_pair_leaves_nothing(
        tmp_path, monkeypatch):
    out, config = _pair(tmp_path)
    _fail_on(monkeypatch, 'link',
             lambda source, target: str(target) == str(config),
             KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_files({str(out): b'weights', str(config): b'config'})
    assert os.listdir(tmp_path) == []


def test_exists_is_decided_when_writing(trained_pspnet, tmp_path, monkeypatch):
    # Another run writes OUT.py after this one checked the outputs and
    # before it writes them: this one must not replace it.
    import mmrepvgg.deploy.pair as module
    out, config = _pair(tmp_path)

    def other_run_first(contents, force):
        config.write_text('the other run')
        return write_files(contents, force)

    monkeypatch.setattr(module, 'write_files', other_run_first)
    with pytest.raises(UsageError, match='deploy.py: already exists'):
        reparameterize(trained_pspnet.config, trained_pspnet.checkpoint,
                       str(out))
    assert config.read_text() == 'the other run'
    assert sorted(os.listdir(tmp_path)) == ['deploy.py']


def test_a_dangling_link_at_out_needs_force(trained_pspnet, tmp_path):
    out, _ = _pair(tmp_path)
    out.symlink_to(tmp_path / 'nowhere')
    with pytest.raises(UsageError, match='already exists'):
        reparameterize(trained_pspnet.config, trained_pspnet.checkpoint,
                       str(out))
    assert out.is_symlink() and not out.exists()


def test_an_output_that_the_config_reads_is_an_input(trained_pspnet, tmp_path):
    base = tmp_path / 'base.py'
    base.write_text(f'_base_ = {trained_pspnet.config!r}\n')
    config = tmp_path / 'config.py'
    config.write_text("_base_ = './base.py'\n")
    before = base.read_bytes()
    with pytest.raises(UsageError, match=r'base\.py: is an input'):
        reparameterize(
            str(config),
            trained_pspnet.checkpoint,
            str(tmp_path / 'base.pth'),
            force=True)
    assert base.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['base.py', 'config.py']


@pytest.mark.slow
@pytest.mark.integration
def test_two_runs_to_the_same_out_leave_one_whole_pair(trained_pspnet,
                                                       tmp_path):
    out, config = _pair(tmp_path)
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, 'tools', 'reparameterize.py'),
        trained_pspnet.config, trained_pspnet.checkpoint,
        str(out)
    ]
    runs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(r.wait(), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert 'already exists' in refused
    written = torch.load(out)
    assert written['meta']['cfg'] == config.read_text()
    assert sorted(os.listdir(tmp_path)) == ['deploy.pth', 'deploy.py']


def _interrupt_writes(tmp_path, signum, force, attempts=200):
    """Send ``signum`` at ``attempts`` moments spread over writing a pair
    (and before and after it), with the handler run_cli installs; check
    what is left each time. Returns the outcomes seen."""
    out, config = _pair(tmp_path)
    new = {str(out): b'w' * (4 << 20), str(config): b'c' * (1 << 20)}
    old = {str(out): b'old weights', str(config): b'old config'}
    start = time.perf_counter()
    write_files(new, force=True)
    span = time.perf_counter() - start
    outcomes = set()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signum, interrupt)
    try:
        for attempt in range(attempts):
            for path in tmp_path.iterdir():
                path.unlink()
            if force:
                write_files(old)
            delay = span * (1.5 * attempt / attempts - 0.2)
            timer = threading.Timer(
                max(delay, 0), os.kill, (os.getpid(), signum))
            try:
                timer.start()
                write_files(new, force)
                timer.join()
                time.sleep(0.001)  # a pending handler runs here
            except KeyboardInterrupt:
                timer.join()
            left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
            expected = [{}, {
                n.name: d
                for n, d in ((out, new[str(out)]), (config, new[str(config)]))
            }]
            if force:
                expected[0] = {
                    out.name: old[str(out)],
                    config.name: old[str(config)]
                }
            assert left in expected, sorted(left)
            outcomes.add(expected.index(left))
    finally:
        signal.signal(signum, previous)
    return outcomes


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize('force', [False, True])
def test_a_signal_at_any_moment_leaves_the_old_files_or_the_new(
        tmp_path, signum, force):
    outcomes = _interrupt_writes(tmp_path, signum, force)
    # Signals came both before the files were in place and after.
    assert outcomes == {0, 1}


def _terminate(process, when, folder):
    """Wait for ``when`` (seconds, or 'tmp': a temporary file in
    ``folder``), then send SIGTERM; returns the exit status."""
    deadline = time.time() + (when if isinstance(when, float) else 600)
    while process.poll() is None and time.time() < deadline and not (
            when == 'tmp'
            and any(name.endswith('.tmp') for name in os.listdir(folder))):
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    return process.wait()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize('when', [0.3, 'tmp'])
def test_sigterm_to_the_tool_leaves_no_temporary_files(trained_pspnet,
                                                       tmp_path, when):
    out, config = _pair(tmp_path)
    process = subprocess.Popen([
        sys.executable,
        os.path.join(REPO_ROOT, 'tools', 'reparameterize.py'),
        trained_pspnet.config, trained_pspnet.checkpoint,
        str(out)
    ],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE,
                               text=True,
                               cwd=REPO_ROOT)
    code = _terminate(process, when, tmp_path)
    left = sorted(os.listdir(tmp_path))
    stderr = process.stderr.read()
    if code == 0:
        assert left == ['deploy.pth', 'deploy.py']
    else:
        assert code == 128 + signal.SIGTERM, stderr
        assert stderr.strip().splitlines() == ['terminated'], stderr
        assert left in ([], ['deploy.pth', 'deploy.py']), left
    assert deploy_config_path(str(out)) == str(config)


# --- requests checked as a whole before any work ---------------------------


def test_benchmark_refuses_int8_without_an_engine(tmp_path, monkeypatch):
    # The module that tools/benchmark.py imports, as a script does.
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, 'tools'))
    import apps.benchmark
    monkeypatch.chdir(tmp_path)
    # Were the request not checked first, the tool would call this.
    monkeypatch.setattr(apps.benchmark, 'run_benchmark', None)
    result = run_tool_here('benchmark.py', PSPNET_A0, '--precisions', 'int8',
                           '--json', 'bench.json')
    assert_refused(
        result, '--precisions int8: no backend asked for runs it; add '
        '--backends onnxruntime or openvino')
    assert os.listdir(tmp_path) == []


def _blocked_work_dir(tmp_path, where):
    """A work dir that is a file, or one whose parent is a file."""
    file = tmp_path / 'file'
    file.write_text('mine')
    if where == 'is a file':
        return file, f'{file}: is a file, not a folder'
    return file / 'run', f'{file / "run"}: {file} is a file, not a folder'


@pytest.mark.parametrize('where', ['is a file', 'inside a file'])
@pytest.mark.parametrize('tool', ['train.py', 'test.py'])
def test_a_work_dir_in_the_way_is_refused_before_the_runner(
        tmp_path, monkeypatch, tool, where):
    monkeypatch.chdir(tmp_path)
    work_dir, message = _blocked_work_dir(tmp_path, where)
    before = snapshot(tmp_path)
    checkpoint = ['no.pth'] if tool == 'test.py' else []
    result = run_tool_here(tool, PSPNET_A0, *checkpoint, '--work-dir',
                           work_dir)
    assert_refused(result, message, tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason='permissions do not stop root')
def test_a_work_dir_in_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / 'read_only'
    folder.mkdir(mode=0o555)
    result = run_tool_here('train.py', PSPNET_A0, '--work-dir', folder / 'run')
    assert_refused(result, f'cannot write in {folder} (permission denied)')
    assert os.listdir(folder) == []
