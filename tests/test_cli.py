"""What every tool shares: a user's mistake is one line (its cause's
traceback only when asked), a bug keeps its traceback, options come from
the typed settings records."""
import argparse

import pytest

from mmrepvgg.cli import add_settings, settings_from
from mmrepvgg.deploy.compare import Fp32Tolerance
from mmrepvgg.deploy.export import ExportSettings
from tests.helpers import TOY_SIZE, assert_refused, run_tool_here


def test_a_bug_keeps_its_traceback(trained_pspnet, tmp_path, monkeypatch):
    import mmrepvgg.deploy.pair as pair

    def buggy(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(pair, 'reparameterize', buggy)
    with pytest.raises(ZeroDivisionError):
        run_tool_here('reparameterize.py', trained_pspnet.config,
                      trained_pspnet.checkpoint, tmp_path / 'deploy.pth')


@pytest.mark.parametrize('debug', [['--debug'], []])
def test_debug_shows_what_caused_an_error(trained_pspnet, tmp_path, debug,
                                          monkeypatch):
    monkeypatch.delenv('MMREPVGG_DEBUG', raising=False)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(trained_pspnet.checkpoint, 'rb').read()[:999])
    result = run_tool_here('export.py', trained_pspnet.config, truncated,
                           tmp_path / 'out.onnx', '--shape', *TOY_SIZE, *debug)
    if not debug:
        assert_refused(result, 'truncated or corrupt')
        return
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == 'Traceback (most recent call last):'
    assert any('direct cause of the following' in line for line in lines)
    assert lines[-1].startswith('error: ') and 'truncated' in lines[-1]


def test_options_and_defaults_come_from_the_settings_records():
    parser = argparse.ArgumentParser()
    add_settings(parser, ExportSettings)
    add_settings(parser, Fp32Tolerance, prefix='tolerance')
    defaults = parser.parse_args([])
    assert settings_from(defaults, ExportSettings) == ExportSettings()
    assert settings_from(defaults, Fp32Tolerance,
                         'tolerance') == Fp32Tolerance()
    given = parser.parse_args(
        ['--shape', '32', '64', '--dynamic', '--tolerance-factor', '4'])
    assert settings_from(given, ExportSettings) == ExportSettings((32, 64),
                                                                  True)
    assert settings_from(given, Fp32Tolerance, 'tolerance').factor == 4
