"""The documentation cannot drift from the code: it builds with warnings as
errors, every tool option that it or the README names exists, and the
package metadata says what is true."""
import ast
import glob
import importlib.metadata
import os.path as osp
import re
import sys

import pytest

import mmrepvgg
from mmrepvgg.config import build_model, read_config
from tests.helpers import REPO_ROOT, output, run

DOCS = osp.join(REPO_ROOT, 'docs')
# History: the changelog, and the dated benchmark records
# (benchmarks/2026-12-04-amd-epyc-avx2.md), which give commands as they ran.
HISTORY = re.compile(r'notes/changelog\.md|benchmarks/\d{4}-\d\d-\d\d-')
sys.path.insert(0, osp.join(DOCS, '_ext'))
from config_table import read_row, read_speedups  # noqa: E402, isort: skip
from tool_cli import load_parser, tool_names  # noqa: E402, isort: skip

# Scripts that hand their arguments to a Python tool.
SCRIPTS = dict(
    dist_train='train',
    slurm_train='train',
    dist_test='test',
    slurm_test='test',
    run_demo='demo')
# Commands of other programs, whose options are theirs.
FOREIGN = re.compile(r'^\s*(\S+=\S+\s+)*(pip|mim|pytest|sphinx-build|srun|'
                     r'torchrun|python -m (pip|pytest))\b')
TOOL = re.compile(r'tools/(\w+)\.(py|sh)\b')
FLAG = re.compile(r'(?<![\w-])(--[a-z][\w-]*)')
# pytest-xdist's, named beside `-n auto` where the docs explain the suite.
FOREIGN_FLAGS = {'--dist'}


def _setup_keywords():
    """The literal keyword arguments of setup.py's ``setup()`` call."""
    with open(osp.join(REPO_ROOT, 'setup.py')) as f:
        tree = ast.parse(f.read())
    call = next(
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'setup')
    keywords = {}
    for keyword in call.keywords:
        try:
            keywords[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # not a literal, such as the version's call
            pass
    return keywords


def _requirement_names(requirements):
    return {re.split(r'[<>=!~\[ ]', r)[0].lower() for r in requirements}


def markdown_files():
    return [osp.join(REPO_ROOT, 'README.md')] + sorted(
        glob.glob(osp.join(DOCS, '**', '*.md'), recursive=True))


def current_markdown_files():
    """The pages that describe the code as it is, not its history."""
    return [
        p for p in markdown_files() if not HISTORY.match(osp.relpath(p, DOCS))
    ]


def code_snippets(text):
    """The lines of a Markdown text's code blocks (continuation lines
    joined) and its code spans (which may wrap a line)."""
    snippets = []
    for block in re.findall(r'```[^\n]*\n(.*?)```', text, re.S):
        snippets += block.replace('\\\n', ' ').splitlines()
    prose = re.sub(r'```.*?```', '', text, flags=re.S)
    snippets += [s.replace('\n', ' ') for s in re.findall(r'`([^`]+)`', prose)]
    return snippets


def tool_flags(snippet):
    """``(tool, flag)`` for each option given to a tool in a snippet: the
    options after ``tools/NAME.py`` (or a script that runs it) up to the
    next tool, comment or command separator."""
    snippet = re.split(r'\s#|;|&&|\|', snippet)[0]
    matches = list(TOOL.finditer(snippet))
    for match, after in zip(matches, matches[1:] + [None]):
        name = SCRIPTS.get(match.group(1), match.group(1))
        if match.group(2) == 'sh' and match.group(1) not in SCRIPTS:
            continue  # run_tests.sh hands its arguments to pytest
        end = after.start() if after else len(snippet)
        for flag in FLAG.findall(snippet[match.end():end]):
            yield name, flag


def unknown_flags(text, flags_of):
    """The options a Markdown text gives a tool that lacks them, and the
    options it names outside any command that no tool has.

    Args:
        text (str): Markdown.
        flags_of (dict): Each tool's option strings, by tool name.
    """
    every_flag = set().union(*flags_of.values()) | FOREIGN_FLAGS
    unknown = []
    for snippet in code_snippets(text):
        if FOREIGN.match(snippet):
            continue
        if TOOL.search(snippet):
            unknown += [
                f'tools/{tool}.py {flag}' for tool, flag in tool_flags(snippet)
                if flag not in flags_of.get(tool, ())
            ]
        else:
            unknown += [
                f for f in FLAG.findall(snippet) if f not in every_flag
            ]
    return unknown


@pytest.fixture(scope='module')
def flags_of():
    return {
        name: set(load_parser(name)._option_string_actions)
        for name in tool_names()
    }


def test_every_tool_has_build_parser(flags_of):
    scripts = {
        osp.splitext(osp.basename(p))[0]
        for p in glob.glob(osp.join(REPO_ROOT, 'tools', '*.py'))
    }
    assert set(flags_of) == scripts
    assert '--int8-equalize' in flags_of['export']


def test_the_flag_check_finds_a_dead_flag(flags_of):
    text = ('```shell\npython tools/export.py C K O.onnx --int8 \\\n'
            '    --no-such-flag\nbash tools/dist_train.sh C 2 --qat K --qat-x'
            '\nmim train mmsegmentation C --gpus 4\n```\n'
            'Use `--int8-report`, not `--int9`, and `tools/infer.py\n'
            '--out-dir` (`tools/test.py --dist`).')
    assert unknown_flags(text, flags_of) == [
        'tools/export.py --no-such-flag', 'tools/train.py --qat-x', '--int9',
        'tools/test.py --dist'
    ]


@pytest.mark.parametrize(
    'path', current_markdown_files(), ids=lambda p: osp.relpath(p, REPO_ROOT))
def test_every_flag_in_the_docs_exists(path, flags_of):
    with open(path) as f:
        text = f.read()
    assert unknown_flags(text, flags_of) == []


def test_the_docs_give_tools_many_flags():
    """The check above sees the commands it is meant to check."""
    found = set()
    for path in markdown_files():
        with open(path) as f:
            for snippet in code_snippets(f.read()):
                found.update(tool_flags(snippet))
    assert len(found) > 60, sorted(found)
    assert ('export', '--qat-min-agreement') in found


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    built = run(sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q',
                '-d', tmp_path / 'doctrees', DOCS, tmp_path / 'html')
    assert built.returncode == 0, output(built)
    with open(tmp_path / 'html' / 'reference' / 'tools.html') as f:
        tools = f.read()
    assert '--qat-min-agreement' in tools
    with open(tmp_path / 'html' / 'user_guides' / 'configs.html') as f:
        configs = f.read()
    for config in glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py')):
        if '_base_' not in config:
            assert osp.relpath(config, REPO_ROOT) in configs


def test_configs_table_counts_what_the_model_holds():
    """Parameters counted on the meta device are the real model's."""
    path = 'configs/pspnet/pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py'
    row = read_row(path)
    model = build_model(read_config(osp.join(REPO_ROOT, path)))
    assert row.params == sum(p.numel() for p in model.parameters())
    mmrepvgg.switch_to_deploy(model)
    assert row.deploy_params == sum(p.numel() for p in model.parameters())
    assert (row.model, row.backbone) == ('PSPNet', 'RepVGG-A0')


def test_configs_table_refuses_a_speedup_of_no_config():
    with pytest.raises(ValueError, match='pspnet_repvgg-a0'):
        read_speedups(['configs/other.py'])


def test_python_requires_is_what_the_code_needs():
    """vermin finds the lowest Python version whose syntax and standard
    library the package and its tools use."""
    # vermin has a console script but no __main__ module.
    found = run(sys.executable, '-c',
                'import sys, vermin; sys.exit(vermin.main())', '--no-tips',
                '--eval-annotations', 'mmrepvgg', 'tools')
    needed = re.search(r'Minimum required versions: (\S+)', found.stdout)
    assert needed, output(found)
    assert _setup_keywords()['python_requires'] == f'>={needed.group(1)}'


def test_long_description_is_the_short_readme():
    with open(osp.join(REPO_ROOT, 'README.md')) as f:
        readme = f.read()
    described = run(sys.executable, 'setup.py', '--long-description')
    assert described.returncode == 0, output(described)
    assert described.stdout.strip() == readme.strip()

    lines = readme.splitlines()
    assert len(lines) <= 200
    assert 'custom_imports' in '\n'.join(lines[:60])
    for config in glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py')):
        if '_base_' not in config:
            assert osp.relpath(config, REPO_ROOT) in readme


def test_docs_extra_installs_what_the_docs_load():
    with open(osp.join(DOCS, 'conf.py')) as f:
        conf = ast.parse(f.read())
    names = {
        t.id: node.value
        for node in conf.body if isinstance(node, ast.Assign)
        for t in node.targets if isinstance(t, ast.Name)
    }
    local = {
        osp.splitext(osp.basename(p))[0]
        for p in glob.glob(osp.join(DOCS, '_ext', '*.py'))
    }
    modules = [
        m for m in ast.literal_eval(names['extensions'])
        if not m.startswith('sphinx.') and m not in local
    ]
    modules += ['sphinx', ast.literal_eval(names['html_theme'])]
    providers = importlib.metadata.packages_distributions()
    needed = {providers[m.split('.')[0]][0].lower() for m in modules}

    with open(osp.join(REPO_ROOT, 'requirements', 'docs.txt')) as f:
        extra = _requirement_names(f.read().split())
    assert {n.replace('_', '-') for n in needed} == extra
    with open(osp.join(REPO_ROOT, 'tools', 'install_deps.sh')) as f:
        installed = re.search(r'\nDOCS=\(([^)]*)\)', f.read()).group(1)
    assert _requirement_names(installed.replace("'", '').split()) == extra
