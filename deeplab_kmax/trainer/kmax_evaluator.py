"""The Orbit evaluation loop: inference, panoptic quality, mIoU and hooks.

Each step runs the model in inference mode (post-processed `panoptic_pred`
and `semantic_pred`), undoes the eval preprocessing on device (drops the
bottom/right padding, resizes back to the raw label size with
nearest-neighbour, corners aligned, like DeepLab2), and hands the maps to
streaming NumPy accumulators in `eval_reduce`, and to the extra-metric
hooks (instance AP, raw prediction files). Results go to the logs,
TensorBoard (through Orbit) and an atomically written JSON file.

Outside TPUs the model is called directly rather than through
`strategy.run`: evaluation examples have different raw sizes, so they run one
at a time on the first device, reading the (mirrored) weights.
"""

import os
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence

from absl import logging
import numpy as np
import orbit
import tensorflow as tf
import tf_keras

from deeplab_kmax import evaluation
from deeplab_kmax import keys
from deeplab_kmax.data import preprocessing
from deeplab_kmax.evaluation import official_panoptic_quality as official_pq
from deeplab_kmax.trainer import summaries

_VIS_IMAGE = 'vis_image'
_VIS_PANOPTIC = 'vis_panoptic'


class ExtraMetric(Protocol):
  """Hook for further metrics or outputs (instance AP, prediction files).

  `update` gets one example's NumPy maps at the raw label size:
  panoptic_pred, semantic_pred, semantic_scores and instance_scores (when
  the model returns them), panoptic_gt / semantic_gt (when labelled) and
  image_name. The scalars of `result` are logged under
  `evaluation/<name>/`; an optional `report()` dict goes into the JSON file.
  """
  name: str

  def reset(self) -> None:
    ...

  def update(self, example: Mapping[str, np.ndarray]) -> None:
    ...

  def result(self) -> Mapping[str, float]:
    ...


def _known_length(dataset) -> Optional[int]:
  """The number of batches of a tf.data.Dataset, when it is known."""
  if not isinstance(dataset, tf.data.Dataset):
    return None
  length = int(dataset.cardinality())
  return length if length >= 0 else None


class KMaXEvaluator(orbit.StandardEvaluator):
  """Evaluates panoptic quality and semantic mIoU on a dataset."""

  def __init__(self,
               model: tf_keras.Model,
               eval_dataset: tf.data.Dataset,
               dataset_info,
               global_step: tf.Variable,
               *,
               model_dir: Optional[str] = None,
               strategy: Optional[tf.distribute.Strategy] = None,
               num_vis_samples: int = 0,
               write_files: bool = True,
               extra_metrics: Sequence[ExtraMetric] = (),
               use_tf_function: bool = True,
               official_panoptic_quality: bool = False):
    """Creates the evaluator.

    Args:
      model: the model; `model(images, training=False)` must return
        `panoptic_pred` and `semantic_pred` at the input resolution.
      eval_dataset: batches of one example with `image` (padded crop) and,
        for metrics, `panoptic_raw` / `semantic_raw` at the original size
        (`panoptic_gt` / `semantic_gt` at the crop are used otherwise), plus
        `resized_image` to know the unpadded extent.
      dataset_info: a `data.dataset_info.DatasetInfo`.
      global_step: the training step, to label results.
      model_dir: where `eval_metrics.json` and `eval/metrics_<step>.json` go.
      strategy: defaults to the current strategy.
      num_vis_samples: images with panoptic overlays written to TensorBoard.
      write_files: False on non-chief workers.
      extra_metrics: further metric hooks, see `ExtraMetric`.
      use_tf_function: compile the step.
      official_panoptic_quality: also report PQ as the official COCO
        panoptic script computes it (`evaluation.official_panoptic_quality`),
        under `official_` keys.
    """
    self._strategy = strategy or tf.distribute.get_strategy()
    self._use_strategy_run = isinstance(self._strategy,
                                        tf.distribute.TPUStrategy)
    self._num_eval_images = _known_length(eval_dataset)
    self._progress_bar = None
    if self._use_strategy_run:
      eval_dataset = self._strategy.experimental_distribute_dataset(
          eval_dataset)
    super().__init__(eval_dataset, orbit.StandardEvaluatorOptions(
        use_tf_function=use_tf_function))
    self._model = model
    self._info = dataset_info
    self._global_step = global_step
    self._model_dir = model_dir
    self._num_vis_samples = num_vis_samples
    self._write_files = write_files
    self._extra_metrics = list(extra_metrics)
    info = dataset_info
    self._panoptic_quality = evaluation.PanopticQuality(
        info.num_classes, info.ignore_label, info.panoptic_label_divisor,
        thing_class_ids=info.thing_class_ids)
    self._official_panoptic_quality = (
        evaluation.OfficialPanopticQuality(
            info.num_classes, info.ignore_label, info.panoptic_label_divisor,
            thing_class_ids=info.thing_class_ids)
        if official_panoptic_quality else None)
    self._semantic_iou = evaluation.SemanticIoU(info.num_classes,
                                                info.ignore_label)
    self._vis_images: List[np.ndarray] = []
    self._num_examples = 0
    self._has_labels = True

  # --- Orbit hooks. -----------------------------------------------------------

  def eval_begin(self):
    self._panoptic_quality.reset()
    if self._official_panoptic_quality is not None:
      self._official_panoptic_quality.reset()
    self._semantic_iou.reset()
    for metric in self._extra_metrics:
      metric.reset()
    self._vis_images = []
    self._num_examples = 0
    self._has_labels = True
    import tqdm  # pylint: disable=g-import-not-at-top
    # disable=None: shown on a terminal only, not in log files.
    self._progress_bar = tqdm.tqdm(
        total=self._num_eval_images, unit='image', disable=None,
        desc=f'eval at step {int(self._global_step.numpy())}')
    return {}

  def eval_step(self, iterator):
    inputs = next(iterator)
    if self._use_strategy_run:
      outputs = self._strategy.run(self._predict, args=(inputs,))
      local = self._strategy.experimental_local_results
      return {key: local(value) for key, value in outputs.items()}
    return self._predict(inputs)

  def eval_reduce(self, state, step_outputs):
    if step_outputs is None:
      return state
    if self._use_strategy_run:
      # {key: (replica results...)} -> one dict per replica.
      keys = list(step_outputs)
      per_replica = [dict(zip(keys, values))
                     for values in zip(*(step_outputs[k] for k in keys))]
    else:
      per_replica = [step_outputs]
    for outputs in per_replica:
      self._accumulate({k: np.asarray(v) for k, v in outputs.items()})
    if self._progress_bar is not None:
      self._progress_bar.update(len(per_replica))
    return state

  def eval_end(self, state=None) -> Dict[str, Any]:
    del state
    if self._progress_bar is not None:
      self._progress_bar.close()
      self._progress_bar = None
    step = int(self._global_step.numpy())
    if self._vis_images:
      tf.summary.image('eval/panoptic_overlay',
                       np.stack(self._pad_to_common(self._vis_images)),
                       step=step, max_outputs=len(self._vis_images))
    logs, reports, extra_scalars = {}, {}, {}
    for metric in self._extra_metrics:
      for key, value in metric.result().items():
        logs[f'evaluation/{metric.name}/{key}'] = value
        extra_scalars[key] = value
      report = getattr(metric, 'report', None)
      if report is not None:
        reports[metric.name] = report()
    if not self._has_labels:
      logging.warning('The eval data has no ground truth; no metrics.')
      return logs
    pq = self._panoptic_quality.result()
    iou = self._semantic_iou.result()
    for key, value in pq.to_flat_dict().items():
      logs[f'evaluation/pq/{key}'] = value
    for key, value in iou.to_flat_dict().items():
      logs[f'evaluation/iou/{key}'] = value
    class_names = [self._info.class_names.get(c, str(c))
                   for c in range(self._info.num_classes)]
    # Per-class tables at DEBUG (--verbosity=1); they are in the JSON file.
    logging.debug('Panoptic quality at step %d over %d images:\n%s', step,
                  self._num_examples, pq.per_class_table(class_names))
    official = self._report_official_panoptic_quality(step, class_names,
                                                      logs)
    logging.debug('Semantic IoU at step %d:\n%s', step,
                  iou.per_class_table(class_names))
    logging.info('%s', summaries.evaluation_table(
        pq.to_flat_dict(), iou.to_flat_dict(), extra_scalars, step,
        self._num_examples))
    if self._write_files and self._model_dir:
      report = {
          'step': step,
          'num_examples': self._num_examples,
          'metrics': logs,
          'panoptic_quality_per_class': {
              class_names[c]: row for c, row in pq.per_class().items()},
          'iou_per_class': {
              class_names[c]: float(iou.iou[c])
              for c in np.flatnonzero(iou.union > 0)},
          **official,
          **reports,
      }
      summaries.write_json_atomically(
          os.path.join(self._model_dir, 'eval', f'metrics_{step:08d}.json'),
          report)
      summaries.write_json_atomically(
          os.path.join(self._model_dir, 'eval_metrics.json'), report)
    return logs

  def _report_official_panoptic_quality(
      self, step: int, class_names: Sequence[str],
      logs: Dict[str, Any]) -> Dict[str, Any]:
    """Adds the official-script PQ to `logs`; returns its JSON entries."""
    metric = self._official_panoptic_quality
    if metric is None:
      return {}
    prefix = official_pq.KEY_PREFIX
    pq = metric.result()
    for key, value in pq.to_flat_dict().items():
      logs[f'evaluation/pq/{prefix}{key}'] = value
    logging.info('Panoptic quality as the official COCO panoptic script '
                 'computes it, at step %d (%d crowd pixels in the ground '
                 'truth):\n%s', step, metric.num_crowd_pixels,
                 pq.per_class_table(class_names))
    if not metric.num_crowd_pixels:
      logging.info('No crowd regions (thing pixels with instance 0) in the '
                   'ground truth: if the records were converted with crowd '
                   'as void, the official number cannot be recovered and '
                   'equals the default one.')
    return {f'{prefix}panoptic_quality_per_class': {
        class_names[c]: row for c, row in pq.per_class().items()}}

  # --- Step and accumulation. --------------------------------------------------

  def _predict(self, inputs: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Inference plus undoing the padding/resizing, on device."""
    images = inputs[keys.IMAGE]
    tf.debugging.assert_equal(
        tf.shape(images)[0], 1,
        message='Evaluation takes one image per batch (raw sizes differ); set '
        'eval_dataset_options.batch_size to 1.')
    predictions = self._model(images, training=False)
    for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED):
      if key not in predictions:
        raise KeyError(f'The model returned {sorted(predictions)} in '
                       f'inference mode; the evaluator needs {key!r}.')
    valid = tf.shape(inputs.get(keys.RESIZED_IMAGE, images))[1:3]
    outputs = {}
    gt_panoptic = inputs.get(keys.GT_PANOPTIC_RAW, inputs.get(keys.GT_PANOPTIC))
    gt_semantic = inputs.get(keys.GT_SEMANTIC_RAW, inputs.get(keys.GT_SEMANTIC))
    if gt_panoptic is not None:
      # Labels at the crop: drop the padding.
      if keys.GT_PANOPTIC_RAW not in inputs:
        gt_panoptic = gt_panoptic[:, :valid[0], :valid[1]]
      raw_size = tf.shape(gt_panoptic)[1:3]
      outputs[keys.GT_PANOPTIC] = gt_panoptic
      if gt_semantic is not None:
        if keys.GT_SEMANTIC_RAW not in inputs:
          gt_semantic = gt_semantic[:, :valid[0], :valid[1]]
        outputs[keys.GT_SEMANTIC] = gt_semantic
    elif keys.GT_SIZE_RAW in inputs:  # Unlabelled: at the image's size.
      raw_size = tf.cast(inputs[keys.GT_SIZE_RAW][0], tf.int32)
    else:
      raw_size = valid
    outputs.update(preprocessing.undo_eval_preprocessing(
        {key: predictions[key]
         for key in (keys.PANOPTIC_PRED, keys.SEMANTIC_PRED,
                     keys.SEMANTIC_SCORES, keys.INSTANCE_SCORES)
         if key in predictions}, valid, raw_size))
    if keys.IMAGE_NAME in inputs and not self._use_strategy_run:
      outputs[keys.IMAGE_NAME] = inputs[keys.IMAGE_NAME]
    if self._num_vis_samples > 0:
      outputs[_VIS_IMAGE] = tf.cast(
          tf.clip_by_value(images[:, :valid[0], :valid[1]], 0, 255), tf.uint8)
      outputs[_VIS_PANOPTIC] = predictions[keys.PANOPTIC_PRED][
          :, :valid[0], :valid[1]]
    return outputs

  def _accumulate(self, outputs: Dict[str, np.ndarray]) -> None:
    self._num_examples += 1
    if keys.GT_PANOPTIC in outputs:
      self._panoptic_quality.update(outputs[keys.GT_PANOPTIC][0],
                                    outputs[keys.PANOPTIC_PRED][0])
      if self._official_panoptic_quality is not None:
        self._official_panoptic_quality.update(outputs[keys.GT_PANOPTIC][0],
                                               outputs[keys.PANOPTIC_PRED][0])
      if keys.GT_SEMANTIC in outputs:
        self._semantic_iou.update(outputs[keys.GT_SEMANTIC][0],
                                  outputs[keys.SEMANTIC_PRED][0])
    else:
      self._has_labels = False
    for metric in self._extra_metrics:
      metric.update({k: v[0] for k, v in outputs.items()})
    if (_VIS_IMAGE in outputs and
        len(self._vis_images) < self._num_vis_samples):
      self._vis_images.append(summaries.panoptic_overlays(
          outputs[_VIS_IMAGE], outputs[_VIS_PANOPTIC], self._info)[0])

  @staticmethod
  def _pad_to_common(images: List[np.ndarray]) -> List[np.ndarray]:
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    return [np.pad(i, ((0, height - i.shape[0]), (0, width - i.shape[1]),
                       (0, 0))) for i in images]
