import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
# What mim and mmengine look for in an installed OpenMMLab package.
MIM_FILES = ('configs', 'tools')


def read_version():
    namespace = {}
    with open(osp.join(ROOT, 'mmrepvgg', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def add_mim_extension():
    """Put the configs and tools into ``mmrepvgg/.mim``, as mmseg does: as
    links for an editable install, as copies for a wheel or an sdist."""
    if {'develop', 'editable_wheel'} & set(sys.argv):
        mode = 'symlink'
    elif {'bdist_wheel', 'sdist'} & set(sys.argv):
        mode = 'copy'
    else:
        return
    mim_path = osp.join(ROOT, 'mmrepvgg', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in MIM_FILES:
        source, target = osp.join(ROOT, name), osp.join(mim_path, name)
        if osp.islink(target) or osp.isfile(target):
            os.remove(target)
        elif osp.isdir(target):
            shutil.rmtree(target)
        if mode == 'symlink':
            os.symlink(osp.relpath(source, mim_path), target)
        else:
            shutil.copytree(
                source,
                target,
                ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


with open(osp.join(ROOT, 'README.md')) as f:
    long_description = f.read()

add_mim_extension()
setup(
    name='mmrepvgg',
    version=read_version(),
    description='RepVGG backbones for mmsegmentation and mmdetection, '
    'with exact train-to-deploy re-parameterization',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(include=['mmrepvgg', 'mmrepvgg.*']),
    package_data={'mmrepvgg': ['.mim/**/*']},
    python_requires='>=3.9',
    install_requires=[
        'mmengine>=0.10.0,<0.11.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'mmsegmentation>=1.0.0,<2.0.0',
    ],
    extras_require={
        'det': ['mmdet>=3.0.0,<4.0.0'],
        'deploy': [
            'onnx>=1.23', 'onnxscript>=0.7', 'onnxruntime>=1.32',
            'openvino>=2026.4'
        ],
        'tests': [
            'pytest', 'pycocotools', 'mmdet>=3.0.0,<4.0.0', 'matplotlib',
            'prettytable', 'onnx>=1.23', 'onnxscript>=0.7',
            'onnxruntime>=1.32', 'openvino>=2026.4', 'vermin'
        ],
        'mim': ['openmim>=0.3.9'],
        # What docs/conf.py loads; autodoc also imports the package.
        'docs': ['sphinx>=7.4', 'myst-parser>=3.0', 'furo>=2024.1.29'],
    },
    zip_safe=False,
)
