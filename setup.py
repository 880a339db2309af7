"""Installs deeplab_kmax: kMaX-DeepLab in TF2 / tf_keras, DeepLab2-compatible."""

import setuptools

INSTALL_REQUIRES = [
    'tensorflow~=2.20.0',
    'tf-keras~=2.20.0',
    'tf-models-official~=2.20.0',
    'numpy',
    'scipy',
    'pycocotools',
    'absl-py',
    'protobuf>=5.27.2',
    'Pillow',
    'tqdm',
]

setuptools.setup(
    name='deeplab_kmax',
    version='0.1.0',
    description=('kMaX-DeepLab panoptic segmentation in TensorFlow 2, '
                 'compatible with DeepLab2 configs, TFRecords and checkpoints.'),
    packages=setuptools.find_packages(include=['deeplab_kmax', 'deeplab_kmax.*']),
    package_data={'deeplab_kmax': ['config/*.proto']},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'test': ['pytest', 'pytest-xdist', 'grpcio-tools'],
        # ONNX export of the network (trainer/export_model.py --onnx_path).
        'onnx': ['tf2onnx>=1.17.0', 'onnxruntime>=1.31.1'],
    },
)
