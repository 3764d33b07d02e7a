import os.path as osp

from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'mmrepvgg', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


with open(osp.join(osp.dirname(__file__), 'README.md')) as f:
    long_description = f.read()

setup(
    name='mmrepvgg',
    version=read_version(),
    description='RepVGG backbones for mmsegmentation and mmdetection, '
    'with exact train-to-deploy re-parameterization',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(include=['mmrepvgg', 'mmrepvgg.*']),
    python_requires='>=3.8',
    install_requires=[
        'mmengine>=0.10.0,<0.11.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'mmsegmentation>=1.0.0,<2.0.0',
    ],
    extras_require={
        'det': ['mmdet>=3.0.0,<4.0.0'],
        'tests': ['pytest', 'pycocotools', 'mmdet>=3.0.0,<4.0.0'],
        'mim': ['openmim>=0.3.9'],
    },
    zip_safe=False,
)
