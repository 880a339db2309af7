"""The kMaX-DeepLab training loss, numerically compatible with DeepLab2.

Combines, with weights from the config's loss options:
  * the PQ-style loss (class term + mask dice term) on Hungarian-matched
    masks (`pq_style`),
  * the mask-ID cross-entropy (`mask_id_cross_entropy`),
  * the pixel-contrastive instance discrimination loss
    (`instance_discrimination`),
  * the auxiliary semantic segmentation loss (`semantic`).
The first three are also applied to each auxiliary prediction of the kMaX
decoder layers ("deep supervision"), under the names `aux_<i><term>`. The
matching is computed once from the final prediction and reused for the
auxiliary ones. Every returned value has shape [batch]; the trainer averages
over the (global) batch. The loss keeps no per-call Python state, so it runs
inside `tf.function`, under `tf.distribute` and with `jit_compile=True`.

DeepLab2 behaviours kept on purpose (see the named options for fixes):
  * losses are averaged over the count of non-zero per-pixel (per-slot)
    losses, not over the pixel count;
  * DeepLab2's loss builder never passes `semantic_sample_k` to the loss, so
    the semantic loss uses every pixel whatever the config says
    (`KMaXLoss.from_config(..., use_semantic_sampling=True)` applies it);
  * the matching is DeepLab2's float32 Hungarian, whose ±999 sentinels round
    the small matching costs, so it can miss the true optimum by ~1e-5
    (`matcher='exact'` solves it exactly);
  * images with more valid ground-truth masks than mask slots get huge
    mask-ID losses and polluted class targets for the masks left unmatched
    (`exclude_unmatched_masks=True` ignores those masks instead).
"""

from typing import Any, Dict, Mapping, Optional

import tensorflow as tf

from deeplab_kmax import keys
from deeplab_kmax.config import model_pb2
from deeplab_kmax.config import trainer_pb2
from deeplab_kmax.data import dataset_info as dataset_info_lib
from deeplab_kmax.data import label_space as label_space_lib
from deeplab_kmax.losses import instance_discrimination
from deeplab_kmax.losses import mask_id_cross_entropy as mask_id_lib
from deeplab_kmax.losses import mask_targets as targets_lib
from deeplab_kmax.losses import pq_style
from deeplab_kmax.losses import semantic as semantic_lib


def auxiliary_loss_name(index: int, term: str) -> str:
  """DeepLab2 glues the prefix to the term: aux_0pq_style_loss_class_term."""
  return f'aux_{index}{term}'


def _enabled(weight: Optional[float]) -> bool:
  return weight is not None and weight > 0.0


class KMaXLoss:
  """kMaX-DeepLab losses: `loss(y_true, y_pred) -> {name: [batch] tensor}`.

  y_true needs `semantic_gt` [B, H, W], `thing_id_mask_gt` [B, H, W],
  `thing_id_class_gt` [B, max_thing_id] and, with a semantic loss,
  `semantic_loss_weight` [B, H, W]. The ground truth may be at the input
  resolution (H = s * (h - 1) + 1); it is read on the prediction grid.
  y_pred needs `pixel_space_mask_logits` [B, h, w, S],
  `transformer_class_logits` [B, S, C + 1], `pixel_space_normalized_feature`
  [B, h, w, D], `semantic_logits` [B, h, w, num_classes] (with a semantic
  loss) and, with auxiliary outputs, `auxiliary_outputs_pred`: a sequence of
  dicts with the first three keys.
  """

  def __init__(self,
               label_space: label_space_lib.LabelSpace,
               *,
               pq_style_weight: Optional[float] = 3.0,
               mask_id_cross_entropy_weight: Optional[float] = 0.3,
               mask_id_cross_entropy_top_k_percent: float = 1.0,
               instance_discrimination_weight: Optional[float] = 1.0,
               instance_discrimination_top_k_percent: float = 1.0,
               instance_discrimination_temperature: float = 0.3,  # Softmax.
               instance_discrimination_sample_k: int = 4096,
               instance_discrimination_sample_temperature: float = 1.5,
               semantic_weight: Optional[float] = 1.0,
               semantic_top_k_percent: float = 1.0,
               semantic_sample_k: int = 0,
               semantic_sample_temperature: float = 1.0,  # Unused at k=0.
               focal_loss_alpha: float = 0.75,
               auxiliary_output_number: int = 0,
               exclude_unmatched_masks: bool = False,
               matcher: str = 'deeplab2',
               seed: Optional[int] = None):
    """Configures the loss; a weight of None or 0 leaves that term out.

    Args:
      label_space: The dataset's ids (`DatasetInfo.label_space`): void,
        things and stuff, and the class-head order the class logits follow.
      pq_style_weight: Weight of the PQ-style loss (both terms).
      mask_id_cross_entropy_weight: Weight of the mask-ID cross-entropy.
      mask_id_cross_entropy_top_k_percent: Hard-pixel fraction it keeps.
      instance_discrimination_weight: Weight of instance discrimination.
      instance_discrimination_top_k_percent: Hard-pixel fraction it keeps.
      instance_discrimination_temperature: Similarity softmax temperature.
      instance_discrimination_sample_k: Pixels sampled for the contrastive
        form (clipped to the pixel count); 0 selects MaX-DeepLab's original
        mask-average form.
      instance_discrimination_sample_temperature: Small-mask sampling bias.
      semantic_weight: Weight of the auxiliary semantic loss.
      semantic_top_k_percent: Hard-pixel fraction the semantic loss keeps.
      semantic_sample_k: Pixels sampled for the semantic loss; 0 (DeepLab2's
        effective behaviour) uses all pixels.
      semantic_sample_temperature: Small-mask sampling bias when sampling.
      focal_loss_alpha: Weight of matched slots in the class term (1 - alpha
        for void-target slots); also scales the dice term.
      auxiliary_output_number: Auxiliary predictions expected in y_pred.
      exclude_unmatched_masks: Fix for images with more valid gt masks than
        slots: leave unmatched masks out of every term instead of DeepLab2's
        ~1e5 mask-ID loss on their pixels and slot-0 class targets.
      matcher: 'deeplab2' reproduces DeepLab2's matching, which is optimal
        only up to float32 rounding of the costs next to its +-999 sentinels
        (ulp ~6e-5 vs. costs that start near 1e-3); 'exact' finds the true
        optimum. See `pq_style.MATCHERS`.
      seed: Optional op seed for the Gumbel sampling noise.
    """
    self._label_space = label_space
    self._pq_style_weight = pq_style_weight
    self._mask_id_weight = mask_id_cross_entropy_weight
    self._mask_id_top_k = mask_id_cross_entropy_top_k_percent
    self._instance_weight = instance_discrimination_weight
    self._instance_top_k = instance_discrimination_top_k_percent
    self._instance_temperature = instance_discrimination_temperature
    self._instance_sample_k = instance_discrimination_sample_k
    self._instance_k_temperature = instance_discrimination_sample_temperature
    self._semantic_weight = semantic_weight
    self._semantic_top_k = semantic_top_k_percent
    self._semantic_k = semantic_sample_k
    self._semantic_k_temperature = semantic_sample_temperature
    self._alpha = focal_loss_alpha
    self._num_aux = auxiliary_output_number
    self._exclude_unmatched = exclude_unmatched_masks
    if matcher not in pq_style.MATCHERS:
      raise ValueError(f'matcher must be one of {sorted(pq_style.MATCHERS)}, '
                       f'got {matcher!r}.')
    self._matcher = matcher
    self._seed = seed
    if len(self.loss_names) == 1:
      raise ValueError('KMaXLoss needs at least one loss term with a positive '
                       'weight.')
    for name, value in [('mask_id_cross_entropy_top_k_percent',
                         self._mask_id_top_k),
                        ('instance_discrimination_top_k_percent',
                         self._instance_top_k),
                        ('semantic_top_k_percent', self._semantic_top_k)]:
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must lie in [0, 1], got {value}.')

  @classmethod
  def from_config(cls,
                  loss_options: trainer_pb2.LossOptions,
                  model_options: model_pb2.ModelOptions,
                  dataset_info: dataset_info_lib.DatasetInfo,
                  auxiliary_output_number: int = 0,
                  use_semantic_sampling: bool = False,
                  **overrides) -> 'KMaXLoss':
    """Builds the loss like DeepLab2's loss builder does for kMaX-DeepLab.

    Args:
      loss_options: `trainer_options.loss_options` (DeepLab2 field names:
        `pq_style_loss`, `mask_id_cross_entropy_loss`,
        `instance_discrimination_loss`, `semantic_loss`, each with `weight`
        and `top_k_percent`). A term is on when its field is set.
      model_options: `model_options`; its `max_deeplab` holds the sampling
        settings.
      dataset_info: The dataset; the loss uses its `label_space`.
      auxiliary_output_number: The model's number of auxiliary predictions
        (0 for evaluation, as in DeepLab2).
      use_semantic_sampling: Apply `max_deeplab.semantic_sample_k` and
        `semantic_sample_temperature`, which DeepLab2's builder drops (also
        switched on by `loss_options.use_semantic_sampling`). The options
        `hungarian_matcher` and `exclude_unmatched_masks` are read from
        `loss_options` too.
      **overrides: Any other constructor argument.
    """

    def option(name):
      return (getattr(loss_options, name) if loss_options.HasField(name) else
              None)

    def weight(name):
      single = option(name)
      return None if single is None else float(single.weight)

    def top_k(name):
      single = option(name)
      return 1.0 if single is None else float(single.top_k_percent)

    max_deeplab = model_options.max_deeplab
    kwargs = dict(
        pq_style_weight=weight('pq_style_loss'),
        mask_id_cross_entropy_weight=weight('mask_id_cross_entropy_loss'),
        mask_id_cross_entropy_top_k_percent=top_k(
            'mask_id_cross_entropy_loss'),
        instance_discrimination_weight=weight('instance_discrimination_loss'),
        instance_discrimination_top_k_percent=top_k(
            'instance_discrimination_loss'),
        instance_discrimination_sample_k=int(
            max_deeplab.instance_discrimination_sample_k),
        instance_discrimination_sample_temperature=float(
            max_deeplab.instance_discrimination_sample_temperature),
        semantic_weight=weight('semantic_loss'),
        semantic_top_k_percent=top_k('semantic_loss'),
        auxiliary_output_number=auxiliary_output_number)
    # deeplab_kmax's loss_options extensions.
    kwargs['matcher'] = loss_options.hungarian_matcher
    kwargs['exclude_unmatched_masks'] = loss_options.exclude_unmatched_masks
    use_semantic_sampling = (use_semantic_sampling or
                             loss_options.use_semantic_sampling)
    if use_semantic_sampling:
      kwargs['semantic_sample_k'] = int(max_deeplab.semantic_sample_k)
      kwargs['semantic_sample_temperature'] = float(
          max_deeplab.semantic_sample_temperature)
    kwargs.update(overrides)
    return cls(dataset_info.label_space, **kwargs)

  @property
  def stuff_class_ids(self) -> list[int]:
    return list(self._label_space.stuff_class_ids)

  @property
  def loss_names(self) -> list[str]:
    """Every key `__call__` returns, in DeepLab2's order."""
    names = [keys.TOTAL_LOSS]
    aux = range(self._num_aux)
    if _enabled(self._pq_style_weight):
      names += [keys.PQ_STYLE_CLASS_TERM, keys.PQ_STYLE_MASK_DICE_TERM]
      for i in aux:
        names += [auxiliary_loss_name(i, keys.PQ_STYLE_CLASS_TERM),
                  auxiliary_loss_name(i, keys.PQ_STYLE_MASK_DICE_TERM)]
    if _enabled(self._mask_id_weight):
      names += [keys.MASK_ID_CROSS_ENTROPY]
      names += [auxiliary_loss_name(i, keys.MASK_ID_CROSS_ENTROPY)
                for i in aux]
    if _enabled(self._instance_weight):
      names += [keys.INSTANCE_DISCRIMINATION]
      names += [auxiliary_loss_name(i, keys.INSTANCE_DISCRIMINATION)
                for i in aux]
    if _enabled(self._semantic_weight):
      names += [keys.SEMANTIC_LOSS]
    return names

  def mask_targets(self, y_true: Mapping[str, tf.Tensor],
                   y_pred: Mapping[str, Any]) -> targets_lib.MaskTargets:
    """The ground-truth masks on the grid of y_pred's mask logits."""
    mask_logits = self._required(y_pred, keys.PIXEL_SPACE_MASK_LOGITS,
                                 'y_pred')
    if mask_logits.shape.rank != 4 or None in mask_logits.shape[1:]:
      raise ValueError(f'{keys.PIXEL_SPACE_MASK_LOGITS} must be [batch, h, w, '
                       f'slots] with static h, w, slots; got '
                       f'{mask_logits.shape}.')
    return targets_lib.build_mask_targets(
        self._required(y_true, keys.GT_SEMANTIC, 'y_true'),
        self._required(y_true, keys.GT_THING_ID_MASK, 'y_true'),
        self._required(y_true, keys.GT_THING_ID_CLASS, 'y_true'),
        output_size=mask_logits.shape[1:3],
        label_space=self._label_space)

  def match(self, y_true: Mapping[str, tf.Tensor],
            y_pred: Mapping[str, Any]) -> pq_style.Matching:
    """The Hungarian matching of the final prediction (for inspection)."""
    targets = self.mask_targets(y_true, y_pred)
    mask_logits, class_logits, _ = self._flat_output(y_pred, 'y_pred')
    return pq_style.match(mask_logits, class_logits, targets, self._matcher)

  def __call__(self, y_true: Mapping[str, tf.Tensor],
               y_pred: Mapping[str, Any]) -> Dict[str, tf.Tensor]:
    """Computes every enabled loss term; each value has shape [batch]."""
    targets = self.mask_targets(y_true, y_pred)
    outputs = [self._flat_output(y_pred, 'y_pred')]
    if self._num_aux:
      auxiliary = y_pred.get(keys.AUXILIARY_OUTPUTS)
      if auxiliary is None or len(auxiliary) != self._num_aux:
        raise ValueError(
            f'Expected {self._num_aux} auxiliary outputs '
            f'under y_pred[{keys.AUXILIARY_OUTPUTS!r}], got '
            f'{None if auxiliary is None else len(auxiliary)}.')
      outputs += [self._flat_output(aux, f'{keys.AUXILIARY_OUTPUTS}[{i}]')
                  for i, aux in enumerate(auxiliary)]
      for i, (mask_logits, _, _) in enumerate(outputs[1:]):
        if mask_logits.shape[1:] != outputs[0][0].shape[1:]:
          raise ValueError(
              f'{keys.AUXILIARY_OUTPUTS}[{i}] mask logits (flattened '
              f'{mask_logits.shape}) must match the final output '
              f'({outputs[0][0].shape}): same grid and number of slots.')
    per_output = [{} for _ in outputs]

    if _enabled(self._instance_weight):
      for losses, (_, _, features) in zip(per_output, outputs):
        losses[keys.INSTANCE_DISCRIMINATION] = self._instance_weight * (
            self._instance_discrimination(features, targets))

    if _enabled(self._pq_style_weight) or _enabled(self._mask_id_weight):
      main_masks, main_classes, _ = outputs[0]
      matching = pq_style.match(main_masks, main_classes, targets,
                                self._matcher)
      matched = pq_style.matched_targets(main_masks, main_classes, targets,
                                         matching, self._exclude_unmatched)
      num_slots = main_masks.shape[-1]
      dice_scale = self._alpha / num_slots
      for losses, (mask_logits, class_logits, _) in zip(per_output, outputs):
        if _enabled(self._pq_style_weight):
          losses[keys.PQ_STYLE_MASK_DICE_TERM] = (
              self._pq_style_weight * dice_scale *
              pq_style.mask_dice_term(mask_logits, targets, matched))
          losses[keys.PQ_STYLE_CLASS_TERM] = self._pq_style_weight * (
              pq_style.class_term(class_logits, matched,
                                  self._alpha))
        if _enabled(self._mask_id_weight):
          losses[keys.MASK_ID_CROSS_ENTROPY] = self._mask_id_weight * (
              mask_id_lib.mask_id_cross_entropy(
                  mask_logits, targets, matched.slot_for_mask,
                  self._mask_id_top_k, self._exclude_unmatched))

    results = dict(per_output[0])
    for i, losses in enumerate(per_output[1:]):
      results.update({auxiliary_loss_name(i, name): value
                      for name, value in losses.items()})
    if _enabled(self._semantic_weight):
      results[keys.SEMANTIC_LOSS] = self._semantic_weight * (
          self._semantic_loss(y_true, y_pred, targets))
    results = {name: results[name] for name in self.loss_names[1:]}
    results[keys.TOTAL_LOSS] = tf.add_n(list(results.values()))
    return results

  def _instance_discrimination(self, features: tf.Tensor,
                               targets: targets_lib.MaskTargets) -> tf.Tensor:
    if self._instance_sample_k > 0:
      return instance_discrimination.pixel_contrastive_loss(
          features, targets, self._instance_sample_k,
          self._instance_k_temperature, self._instance_temperature,
          self._instance_top_k, seed=self._seed)
    return instance_discrimination.mask_average_loss(
        features, targets, self._instance_temperature, self._instance_top_k)

  def _semantic_loss(self, y_true, y_pred, targets) -> tf.Tensor:
    return semantic_lib.semantic_cross_entropy(
        tf.cast(self._required(y_pred, keys.SEMANTIC_LOGITS, 'y_pred'),
                tf.float32),
        self._required(y_true, keys.GT_SEMANTIC, 'y_true'),
        self._required(y_true, keys.SEMANTIC_LOSS_WEIGHT, 'y_true'),
        num_classes=self._label_space.num_classes,
        ignore_label=self._label_space.ignore_label,
        top_k_percent=self._semantic_top_k,
        sample_k=self._semantic_k,
        sample_temperature=self._semantic_k_temperature,
        targets=targets,
        seed=self._seed)

  def _flat_output(self, output: Mapping[str, Any], where: str):
    """(mask logits [B, P, S], class logits [B, S, C+1], features [B, P, D])."""
    mask_logits, class_logits, features = (
        tf.cast(self._required(output, key, where), tf.float32)
        for key in (keys.PIXEL_SPACE_MASK_LOGITS, keys.TRANSFORMER_CLASS_LOGITS,
                    keys.PIXEL_SPACE_NORMALIZED_FEATURE))
    _, height, width, num_slots = mask_logits.shape
    expected_classes = self._label_space.class_head_outputs
    if (class_logits.shape.rank != 3 or
        class_logits.shape[1:] != [num_slots, expected_classes]):
      raise ValueError(
          f'{where}[{keys.TRANSFORMER_CLASS_LOGITS!r}] must be [batch, '
          f'{num_slots}, {expected_classes}] (slots, thing+stuff classes + '
          'void), got '
          f'{class_logits.shape}.')
    if features.shape.rank != 4 or features.shape[1:3] != [height, width]:
      raise ValueError(f'{where}[{keys.PIXEL_SPACE_NORMALIZED_FEATURE!r}] '
                       f'must be [batch, {height}, {width}, D], got '
                       f'{features.shape}.')
    batch = tf.shape(mask_logits)[0]
    num_pixels = height * width
    return (tf.reshape(mask_logits, [batch, num_pixels, num_slots]),
            class_logits,
            tf.reshape(features, [batch, num_pixels, features.shape[-1]]))

  @staticmethod
  def _required(mapping: Mapping[str, Any], key: str, where: str):
    if key not in mapping:
      raise KeyError(f'{where} is missing {key!r}; it has {sorted(mapping)}.')
    return mapping[key]
