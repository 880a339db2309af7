"""The kMaX-DeepLab meta-architecture: encoder -> decoders -> head -> merge.

image [B, H, W, 3] in 0..255
  -> pixel encoder (ResNet-50, Axial-ResNet-50 or ConvNeXt) stage1..stage5
  -> pixel decoder: decoder_stage1..3 (strides 32, 16, 8), decoder_output
  -> kMaX transformer decoder: N cluster centres refined by six k-means
     blocks (two per stride 32/16/8), each with its own deep-supervised
     prediction, then class / mask embeddings of the centres
  -> MaX-DeepLab head: mask logits, class logits, auxiliary semantic logits
  -> mask-wise merge (inference only): panoptic / semantic / instance maps.

The sub-modules are exposed through `checkpoint_items` under DeepLab2's
names, so `tf.train.Checkpoint(**model.checkpoint_items)` reads and writes
DeepLab2 kMaX checkpoints.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras

from deeplab_kmax import checkpoint_io
from deeplab_kmax import heads
from deeplab_kmax import keys
from deeplab_kmax import kmax_decoder
from deeplab_kmax import pixel_decoder as pixel_decoder_lib
from deeplab_kmax import post_processing
from deeplab_kmax.config import config_pb2
from deeplab_kmax.config import resolve
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.layers import normalization
from deeplab_kmax.layers import recompute
from deeplab_kmax.ops import resize
from deeplab_kmax.pixel_encoder import axial_resnet
from deeplab_kmax.pixel_encoder import convnext


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
  """Dataset-dependent architecture choices (DeepLab2 picks them by name).

  COCO, ADE20K and unknown datasets: 128 slots, outputs at stride 4 and an
  auxiliary semantic decoder. Cityscapes: 256 slots, stride 2, and the
  semantic head sits directly on the encoder's stride-32 feature.
  """
  num_mask_slots: int
  high_resolution_output_stride: int
  use_semantic_decoder: bool

  @classmethod
  def for_dataset(cls, dataset_name: str,
                  num_mask_slots: Optional[int] = None) -> 'DatasetLayout':
    """DeepLab2's layout for a dataset; `num_mask_slots` overrides N."""
    if 'cityscapes' in dataset_name:
      layout = cls(256, 2, False)
    else:
      layout = cls(128, 4, True)
    if num_mask_slots:
      layout = dataclasses.replace(layout, num_mask_slots=num_mask_slots)
    return layout


def build_pixel_encoder(backbone: config_pb2.ModelOptions.BackboneOptions,
                        bn_layer: normalization.NormLayer) -> tf_keras.layers.Layer:
  """ResNet-50, Axial-ResNet-50 (MaX-S) or ConvNeXt-T/S/B/L by config name."""
  name = backbone.name.lower()
  short = name[len('kmax_'):] if name.startswith('kmax_') else name
  keep_prob = backbone.drop_path_keep_prob
  if short.startswith('convnext_'):
    if (backbone.backbone_width_multiplier != 1.0 or
        backbone.stem_width_multiplier != 1.0 or
        backbone.backbone_layer_multiplier != 1.0):
      raise ValueError('model_options.backbone: width/layer multipliers are '
                       'supported for the ResNet encoders only, not for '
                       f'{backbone.name!r}.')
    return convnext.build_convnext(short[len('convnext_'):],
                                   drop_path_keep_prob=keep_prob)
  if short in ('resnet50', 'axial_resnet50'):
    return axial_resnet.build_axial_resnet(
        short, drop_path_keep_prob=keep_prob, bn_layer=bn_layer,
        width_multiplier=backbone.backbone_width_multiplier,
        stem_width_multiplier=backbone.stem_width_multiplier,
        layer_multiplier=backbone.backbone_layer_multiplier)
  raise ValueError(
      f'model_options.backbone.name {backbone.name!r} is not a kMaX pixel '
      'encoder; expected one of kmax_resnet50, kmax_axial_resnet50, '
      'kmax_convnext_{tiny,small,base,large}.')


class KMaXDeepLab(tf_keras.Model):
  """kMaX-DeepLab: panoptic segmentation by k-means mask transformers.

  `model(images, training=False)` returns DeepLab2's output dict, with the
  post-processed `panoptic_pred`, `semantic_pred`, `instance_pred`,
  `instance_scores` and `semantic_scores` at the input size. With
  training=True it returns the raw predictions plus `auxiliary_outputs_pred`,
  one prediction dict per k-means block, resized to the final stride, for
  deep supervision.
  """

  def __init__(self,
               pixel_encoder: tf_keras.layers.Layer,
               pixel_decoder: pixel_decoder_lib.KMaXPixelDecoder,
               transformer_decoder: kmax_decoder.KMaXTransformerDecoder,
               predictor: heads.MaXDeepLabHead,
               post_processor: post_processing.MaskWisePostProcessor,
               name: str = 'kMaXDeepLab'):
    super().__init__(name=name)
    self.pixel_encoder = pixel_encoder
    self.pixel_decoder = pixel_decoder
    self.transformer_decoder = transformer_decoder
    self.predictor = predictor
    self.post_processor = post_processor

  @property
  def checkpoint_items(self) -> Dict[str, tf.Module]:
    """DeepLab2's checkpoint layout: encoder, decoders and head parts."""
    return {
        'encoder': self.pixel_encoder,
        'pixel_decoder': self.pixel_decoder,
        'transformer_decoder': self.transformer_decoder,
        **self.predictor.checkpoint_items,
    }

  @property
  def auxiliary_output_number(self) -> int:
    """Deep-supervision predictions in training mode (one per k-means block)."""
    return len(self.transformer_decoder.blocks)

  @property
  def backbone_variables(self) -> Sequence[tf.Variable]:
    """Trainable encoder variables (they get the backbone LR multiplier)."""
    return self.pixel_encoder.trainable_variables

  def predict_raw(self, images: tf.Tensor,
                  training=False) -> Dict[str, Any]:
    """Network outputs before post-processing, for images in 0..255."""
    pixels = images / 127.5 - 1.0
    endpoints = self.pixel_encoder(pixels, training=training)
    features = dict(endpoints)
    features.update(self.pixel_decoder(endpoints, training=training))
    features = self.transformer_decoder(features, training=training)
    return self.predictor(features, training=training)

  def call(self, images: tf.Tensor, training=False,
           run_post_processing: bool = True) -> Dict[str, Any]:
    """Training: raw outputs with the resized deep-supervision predictions.

    Inference: the auxiliary predictions are dropped and, unless
    `run_post_processing` is off, the merged maps (`panoptic_pred`, ...)
    at the input size are added.
    """
    images = tf.cast(images, self.compute_dtype)  # float32 unless mixed
    outputs = self.predict_raw(images, training=training)
    if training:
      outputs[keys.AUXILIARY_OUTPUTS] = _resize_auxiliary_outputs(outputs)
      return outputs
    outputs.pop(keys.AUXILIARY_OUTPUTS, None)
    if run_post_processing:
      outputs.update(self.post_processor(
          outputs[keys.PIXEL_SPACE_MASK_LOGITS],
          outputs[keys.TRANSFORMER_CLASS_LOGITS],
          output_size=tf.shape(images)[1:3]))
    return outputs

  def restore_initial_checkpoint(
      self, checkpoint_path: str,
      restore_semantic_last_layer: bool = True,
      restore_class_last_layer: bool = True) -> checkpoint_io.RestoreReport:
    """Restores what a (DeepLab2 or own) checkpoint holds; reports the rest.

    The model must be built. Turn off the last-layer options to fine-tune
    on a dataset with a different label set (`checkpoint_io.RestoreMode`).
    """
    return checkpoint_io.restore_model(
        self.checkpoint_items, checkpoint_path,
        checkpoint_io.RestoreMode.fine_tune(restore_semantic_last_layer,
                                            restore_class_last_layer))


def encoder_stage_layers(
    encoder: tf_keras.layers.Layer) -> List[tf_keras.layers.Layer]:
  """The pixel encoder's stages in call order (ResNets: stem + 4 stages)."""
  if isinstance(encoder, axial_resnet.AxialResNet):
    return encoder.stage_layers
  if isinstance(encoder, convnext.ConvNeXtEncoder):
    return list(encoder.stages)
  raise TypeError(f'No known stages in pixel encoder {encoder.name!r} of '
                  f'type {type(encoder).__name__}.')


def enable_activation_recomputation(model: KMaXDeepLab) -> None:
  """Recomputes, in backprop, each encoder stage and each k-means block.

  `trainer_options.recompute_activations`; see `layers/recompute.py`.
  Gradients and moving statistics stay those of the plain step.
  """
  for layer in (*encoder_stage_layers(model.pixel_encoder),
                *model.transformer_decoder.blocks):
    recompute.enable(layer)


def _resize_auxiliary_outputs(outputs: Dict[str, Any]) -> Tuple[Dict, ...]:
  """Brings each block's pixel predictions to the final output stride."""
  size = tf.shape(outputs[keys.PIXEL_SPACE_MASK_LOGITS])[1:3]
  resized = []
  for prediction in outputs[keys.AUXILIARY_OUTPUTS]:
    prediction = dict(prediction)
    for key in (keys.PIXEL_SPACE_MASK_LOGITS,
                keys.PIXEL_SPACE_NORMALIZED_FEATURE):
      prediction[key] = resize.bilinear_two_pass_if_narrow(
          prediction[key], size)
    resized.append(prediction)
  return tuple(resized)


def _scaled(channels: int, multiplier: float) -> int:
  if multiplier <= 0:
    raise ValueError(f'width multipliers must be positive, got {multiplier}.')
  return max(8, int(round(channels * multiplier / 8)) * 8)


def build_model(config: config_pb2.ExperimentOptions,
                dataset_info: Optional[dataset_info_lib.DatasetInfo] = None,
                crop_size: Optional[Sequence[int]] = None) -> KMaXDeepLab:
  """Builds (and creates the variables of) kMaX-DeepLab for a config.

  Args:
    config: experiment options; model, solver (batch norm) and evaluator
      options are read.
    dataset_info: the dataset; by default the train dataset's descriptor.
    crop_size: (height, width) of the dummy call that creates the variables;
      defaults to 129 x 129. Variables do not depend on it, any size runs
      afterwards; a small call keeps build time and peak memory down.

  Returns:
    A built KMaXDeepLab.
  """
  if dataset_info is None:
    dataset_info = dataset_info_lib.get_dataset_info(
        config.train_dataset_options)
  solver = config.trainer_options.solver_options
  bn_layer = normalization.batch_norm_factory(
      solver.use_sync_batchnorm, solver.batchnorm_momentum,
      solver.batchnorm_epsilon)
  model_options = config.model_options
  max_deeplab = model_options.max_deeplab
  aspp_options = model_options.decoder
  layout = DatasetLayout.for_dataset(dataset_info.name,
                                     max_deeplab.num_mask_slots)
  center_channels = _scaled(kmax_decoder.CENTER_CHANNELS,
                            max_deeplab.transformer_decoder_width_multiplier)

  label_space = dataset_info.label_space
  semantic_classes = max_deeplab.auxiliary_semantic_head.output_channels
  if semantic_classes != label_space.num_classes:
    raise ValueError(
        'model_options.max_deeplab.auxiliary_semantic_head.output_channels is '
        f'{semantic_classes} but dataset {dataset_info.name!r} has '
        f'num_classes={label_space.num_classes} (its descriptor\'s '
        'num_classes, void included when the ignore label is below it); '
        'expected them equal.')
  num_classes = label_space.class_head_outputs
  head_args = dict(
      num_classes=num_classes,
      pixel_space_head_channels=max_deeplab.pixel_space_head.head_channels,
      mask_embedding_channels=max_deeplab.pixel_space_head.output_channels,
      head_conv_type=max_deeplab.pixel_space_head.head_conv_type,
      bn_layer=bn_layer,
      activation='gelu')

  encoder = build_pixel_encoder(model_options.backbone, bn_layer)
  pixel_decoder = pixel_decoder_lib.KMaXPixelDecoder(
      high_resolution_output_stride=layout.high_resolution_output_stride,
      bn_layer=bn_layer,
      width_multiplier=max_deeplab.pixel_decoder_width_multiplier)
  transformer_decoder = kmax_decoder.KMaXTransformerDecoder(
      num_mask_slots=layout.num_mask_slots,
      num_classes=num_classes,
      drop_path_keep_prob=resolve.transformer_decoder_drop_path_keep_prob(
          model_options, dataset_info.name),
      bn_layer=bn_layer,
      center_channels=center_channels,
      feed_forward_channels=_scaled(
          kmax_decoder.FEED_FORWARD_CHANNELS,
          max_deeplab.transformer_decoder_width_multiplier),
      auxiliary_pixel_head_channels=max_deeplab.pixel_space_head.head_channels,
      auxiliary_mask_embedding_channels=(
          max_deeplab.pixel_space_head.output_channels),
      auxiliary_head_conv_type=max_deeplab.pixel_space_head.head_conv_type,
      cluster_decoder=max_deeplab.cluster_decoder,
      pixel_cluster_interaction=max_deeplab.pixel_cluster_interaction,
      clusterformer_iterations=max_deeplab.clusterformer_iterations)
  predictor = heads.MaXDeepLabHead(
      semantic_num_classes=semantic_classes,
      use_semantic_decoder=layout.use_semantic_decoder,
      semantic_head_channels=max_deeplab.auxiliary_semantic_head.head_channels,
      aspp_channels=aspp_options.aspp_channels,
      decoder_channels=aspp_options.decoder_channels,
      atrous_rates=tuple(aspp_options.atrous_rates),
      low_level=tuple((item.feature_key, item.channels_project)
                      for item in max_deeplab.auxiliary_low_level),
      high_level_feature_key=aspp_options.feature_key,
      decoder_conv_type=aspp_options.decoder_conv_type,
      **head_args)
  post_processor = post_processing.MaskWisePostProcessor.from_options(
      config.evaluator_options, label_space)
  model = KMaXDeepLab(encoder, pixel_decoder, transformer_decoder, predictor,
                      post_processor)
  if crop_size is None:
    crop_size = (129, 129)
  height, width = (int(s) for s in crop_size)
  model(tf.zeros([1, height, width, 3]), training=False)
  if config.trainer_options.recompute_activations:
    enable_activation_recomputation(model)
  return model
