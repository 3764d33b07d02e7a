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


def requirements(name):
    """The requirements listed in ``requirements/<name>.txt``."""
    with open(osp.join(ROOT, 'requirements', f'{name}.txt')) as f:
        return [line.strip() for line in f if line.strip()]


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
    # As OpenMMLab's packages do, torch and mmcv are not pulled: torch is
    # the user's own build, and mim installs mmcv (with mmengine and mmseg,
    # the [mim] extra) prebuilt for it. The runtime needs neither.
    install_requires=['numpy'],
    extras_require={
        'runtime': requirements('runtime'),
        'openvino': requirements('runtime') + ['openvino>=2026.4'],
        'mim': requirements('mminstall'),
        'det': ['mmdet>=3.0.0,<4.0.0'],
        'deploy': requirements('deploy'),
        'tests': requirements('tests') + requirements('deploy'),
        'docs': requirements('docs'),
    },
    entry_points={
        'console_scripts': ['mmrepvgg-infer = mmrepvgg.runtime.infer:console'],
    },
    zip_safe=False,
)
