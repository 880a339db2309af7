"""Stateless TensorFlow ops shared by the data, model and export code.

The bottom layer of the package: it imports nothing from deeplab_kmax, and
every other layer may import it.

  resize   corner-aligned bilinear / nearest resizing (DeepLab2's convention)
"""
