"""The package stands alone: it never imports the repository's tools, its
modules import each other in layers, without cycles (imports inside
functions included), and importing it (as every training run does) loads
no deployment code."""
import ast
import os.path as osp
import pkgutil
import sys

import mmrepvgg
from tests.helpers import output, run

PACKAGE_ROOT = osp.dirname(mmrepvgg.__file__)


def _modules():
    """Module name to source path, for every module of the package."""
    modules = {'mmrepvgg': osp.join(PACKAGE_ROOT, '__init__.py')}
    for info in pkgutil.walk_packages([PACKAGE_ROOT], 'mmrepvgg.'):
        path = osp.join(info.module_finder.path, info.name.rsplit('.', 1)[-1])
        modules[info.name] = osp.join(
            path, '__init__.py') if info.ispkg else path + '.py'
    return modules


def _imports(name, path):
    """Names of the modules that a module imports, relative ones
    resolved."""
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')
                parent = parent[:len(parent) - node.level + 1]
                base = '.'.join(parent + ([base] if base else []))
            yield base
            yield from (f'{base}.{alias.name}' for alias in node.names)


def _graph():
    modules = _modules()
    return {
        name: {m
               for m in _imports(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }, modules


def test_the_package_never_imports_the_tools():
    modules = _modules()
    assert len(modules) > 15
    for name, path in modules.items():
        for imported in _imports(name, path):
            assert imported.split('.')[0] not in ('tools', 'apps'), (name,
                                                                     imported)


def test_no_import_cycles():
    # Package __init__ files count as modules: one that imports a module
    # which imports the package back is a cycle too.
    edges, modules = _graph()
    assert any(
        name.endswith('__init__.py') and edges[module]
        for module, name in modules.items())
    state = {}

    def visit(name, path):
        state[name] = 'open'
        for dep in sorted(edges[name]):
            assert state.get(dep) != 'open', ' -> '.join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 'done'

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


# The package's layers, lowest first: a module imports only modules of its
# own layer or of a lower one, inside functions too.
LAYERS = (
    ('mmrepvgg.errors', 'mmrepvgg.version', 'mmrepvgg.logs'),
    # Without torch: what the runtime's install has.
    ('mmrepvgg.fileio', 'mmrepvgg.cli', 'mmrepvgg.runtime'),
    ('mmrepvgg.checkpoint', 'mmrepvgg.config'),
    ('mmrepvgg.models', 'mmrepvgg.pretrained'),
    ('mmrepvgg.deploy', ),
    ('mmrepvgg.quantization', ),
    ('mmrepvgg.runner', 'mmrepvgg.testing', 'mmrepvgg.qat', 'mmrepvgg'),
)


def _layer(module):
    """The index in :data:`LAYERS` of the longest prefix of ``module``."""
    found = [(len(prefix), index) for index, layer in enumerate(LAYERS)
             for prefix in layer
             if module == prefix or module.startswith(prefix + '.')]
    assert found, f'{module}: in no layer of LAYERS'
    return max(found)[1]


def test_no_module_imports_a_higher_layer():
    edges, _ = _graph()
    assert _layer('mmrepvgg.quantization.ptq') > _layer('mmrepvgg.deploy')
    upward = [(name, dep) for name, deps in sorted(edges.items())
              for dep in sorted(deps) if _layer(dep) > _layer(name)]
    assert upward == []


def test_import_mmrepvgg_loads_no_export_quantization_or_engines():
    code = ('import sys, mmrepvgg; print(" ".join(sorted(m for m in '
            'sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", '
            '"openvino", "onnxscript") or m.startswith("mmrepvgg.deploy."))))')
    result = run(sys.executable, '-c', code)
    assert result.returncode == 0, output(result)
    assert result.stdout.split() == []
    # What it registers is there, and the deploy names load on first use.
    assert callable(mmrepvgg.reparameterize)
