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

# The published and demo configs ship as package data: the repository's
# configs/ folder becomes deeplab_kmax/configs in the package, where
# `config.load_config('coco/kmax_meta_r50')` finds them.
CONFIGS_PACKAGE = 'deeplab_kmax.configs'

# Console scripts: thin wrappers of the mains inside the package (the
# documented `python trainer/train.py ...` scripts call the same mains).
CONSOLE_SCRIPTS = [
    'kmax-train = deeplab_kmax.trainer.train:run',
    'kmax-export = deeplab_kmax.export.export_cli:run',
    'kmax-predict = deeplab_kmax.predict:run',
    'kmax-app = deeplab_kmax.app:run',
]

setuptools.setup(
    name='deeplab_kmax',
    version='0.1.0',
    description=('kMaX-DeepLab panoptic segmentation in TensorFlow 2, '
                 'compatible with DeepLab2 configs, TFRecords and checkpoints.'),
    packages=setuptools.find_packages(
        include=['deeplab_kmax', 'deeplab_kmax.*']) + [CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: 'configs'},
    package_data={'deeplab_kmax': ['config/*.proto', 'data/categories/*.csv'],
                  CONFIGS_PACKAGE: ['**/*.textproto']},
    entry_points={'console_scripts': CONSOLE_SCRIPTS},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # cityscapesscripts: the official panoptic script (panopticapi's
        # pq_compute) that tests/evaluation scores predictions with.
        # playwright: drives a headless Chromium through the app's page
        # (tests/test_app.py; the browser itself comes from the system).
        'test': ['pytest', 'pytest-xdist>=3.8', 'grpcio-tools',
                 'cityscapesscripts>=2.2', 'playwright'],
        # ONNX export of the network (trainer/export_model.py --onnx_path).
        'onnx': ['tf2onnx>=1.17.0', 'onnxruntime>=1.31.1'],
        # The try-a-model web page (python -m deeplab_kmax.app, kmax-app).
        'app': ['gradio>=5.0'],
        # Video input of the predict CLI: frames in, overlay video out
        # (imageio-ffmpeg ships its own ffmpeg binary).
        'video': ['imageio-ffmpeg>=0.5'],
    },
)
