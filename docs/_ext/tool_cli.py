"""``{tool-cli} NAME``: the command line of ``tools/NAME.py``, rendered at
build time from the parser that its ``build_parser()`` returns, so that the
reference cannot drift from the code.

Every tool that has a ``build_parser`` must be rendered somewhere: one that
is not is a warning, an error under ``-W``.
"""
import argparse
import functools
import glob
import importlib.util
import os.path as osp
import re
import signal
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

TOOLS = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools')
WIDTH = 79
# A tool's own build_parser, or the library's that it runs.
DEFINES_PARSER = re.compile(r'^(def|from .* import) build_parser\b', re.M)
logger = logging.getLogger(__name__)


def tool_names():
    """The tools in ``tools/`` that have a ``build_parser``."""
    names = []
    for path in sorted(glob.glob(osp.join(TOOLS, '*.py'))):
        with open(path) as f:
            if DEFINES_PARSER.search(f.read()):
                names.append(osp.splitext(osp.basename(path))[0])
    return names


@functools.lru_cache(maxsize=None)
def load_parser(name):
    """The parser of ``tools/NAME.py``, imported by path with ``tools/``
    first on ``sys.path``, as Python puts a script's folder (the tools
    import their applications as ``apps``), named as a user runs it.

    A tool's first import sets Ctrl-C and SIGTERM handlers that end the
    process (``apps.interrupts``); the caller's handlers are put back.
    """
    path = osp.join(TOOLS, f'{name}.py')
    handlers = {
        s: signal.getsignal(s)
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    sys.path.insert(0, TOOLS)
    try:
        spec = importlib.util.spec_from_file_location(f'_tool_{name}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(TOOLS)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    parser = module.build_parser()
    parser.prog = f'python tools/{name}.py'
    parser.formatter_class = functools.partial(
        argparse.HelpFormatter, width=WIDTH)
    return parser


def _option_term(action, formatter):
    """``--flag METAVAR`` of an option, ``NAME`` of a positional."""
    if not action.option_strings:
        return formatter._metavar_formatter(action, action.dest)(1)[0]
    if action.nargs == 0:
        return ', '.join(action.option_strings)
    args = formatter._format_args(action, action.dest.upper())
    return ', '.join(f'{s} {args}' for s in action.option_strings)


def render_parser(parser):
    """Docutils nodes for a parser: its usage and, per group, each
    argument with its help."""
    formatter = parser._get_formatter()
    result = [nodes.literal_block(text=parser.format_usage().strip())]
    for group in parser._action_groups:
        actions = [
            a for a in group._group_actions if a.help is not argparse.SUPPRESS
        ]
        if not actions:
            continue
        result.append(nodes.rubric(text=group.title))
        items = nodes.definition_list()
        for action in actions:
            term = nodes.term('', '')
            term += nodes.literal(text=_option_term(action, formatter))
            definition = nodes.definition()
            definition += nodes.paragraph(
                text=formatter._expand_help(action) if action.help else '')
            items += nodes.definition_list_item('', term, definition)
        result.append(items)
    return result


class ToolCli(SphinxDirective):
    """The description, usage and arguments of one tool."""
    required_arguments = 1

    def run(self):
        name = self.arguments[0]
        if name not in tool_names():
            raise self.error(f'tools/{name}.py has no build_parser()')
        self.env.note_dependency(osp.join(TOOLS, f'{name}.py'))
        self.env.tool_cli_rendered = _rendered(self.env) | {name}
        parser = load_parser(name)
        # The description is the tool's docstring, in reStructuredText;
        # the pages are MyST Markdown.
        text = [
            '```{eval-rst}', *(parser.description or '').splitlines(), '```'
        ]
        description = nodes.container()
        self.state.nested_parse(
            StringList(text, source=f'tools/{name}.py'), self.content_offset,
            description)
        return [*description.children, *render_parser(parser)]


def _rendered(env):
    return getattr(env, 'tool_cli_rendered', set())


def check_all_rendered(app, env):
    missing = set(tool_names()) - _rendered(env)
    for name in sorted(missing):
        logger.warning(f'tools/{name}.py has a parser that no page renders '
                       '(add a {tool-cli} directive)')


def merge_rendered(app, env, docnames, other):
    env.tool_cli_rendered = _rendered(env) | _rendered(other)


def setup(app):
    app.add_directive('tool-cli', ToolCli)
    app.connect('env-check-consistency', check_all_rendered)
    app.connect('env-merge-info', merge_rendered)
    return dict(parallel_read_safe=True, parallel_write_safe=True)
