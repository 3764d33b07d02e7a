"""Sphinx configuration of the mmrepvgg documentation.

Built with warnings as errors (``sphinx-build -W --keep-going docs OUT``,
run by ``tests/test_docs.py``): a renamed module, a dead cross-reference
or a tool option that no longer exists fails the build.
"""
import os.path as osp
import sys

from sphinx.util import logging

DOCS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(DOCS)
# The package from this checkout; the tools import their applications as
# ``apps`` (tools/ is on sys.path when a tool runs as a script).
for path in (osp.join(DOCS, '_ext'), osp.join(ROOT, 'tools'), ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

project = 'mmrepvgg'
author = 'mmrepvgg contributors'
copyright = '2026, mmrepvgg contributors'


def _version():
    namespace = {}
    with open(osp.join(ROOT, 'mmrepvgg', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


release = version = _version()
logger = logging.getLogger(__name__)

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
    'tool_cli',
    'config_table',
]
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3
source_suffix = {'.md': 'markdown'}
exclude_patterns = ['_build', '_ext', 'Thumbs.db', '.DS_Store']
# Options such as --min-agreement stay as typed, not with an en dash.
smartquotes = False

# The page of autodoc's output (see _dead_page_reference).
API_PAGE = 'reference/api'
autodoc_member_order = 'bysource'
autodoc_typehints = 'none'
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'furo'
html_title = f'mmrepvgg {release}'


def _dead_page_reference(app, env, node, contnode):
    """A Python cross-reference written in a page must resolve (a warning,
    an error under -W); those that docstrings give to third-party types are
    left as text, as Sphinx does by default."""
    if node.get('refdomain') == 'py' and node.get('refdoc') != API_PAGE:
        logger.warning(
            f"dead cross-reference: {node['reftype']} "
            f"{node['reftarget']}",
            location=node)


def setup(app):
    app.connect('missing-reference', _dead_page_reference)
