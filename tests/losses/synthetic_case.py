"""A small panoptic loss case built like the DeepLab2 golden, plus a numpy
reference implementation of the kMaX losses written from the paper's
definitions with plain loops (no code shared with the library)."""

import dataclasses

import numpy as np
from scipy import optimize

from deeplab_kmax.data import label_space

IGNORE_LABEL = 0
THING_IDS = [1, 2, 3, 4, 5, 6]
STUFF_IDS = [7, 8, 9, 10]
NUM_CLASSES = 11  # Void (0) + 10 classes; class logits have 10 + 1 channels.
LABEL_SPACE = label_space.LabelSpace(NUM_CLASSES, IGNORE_LABEL, 256,
                                     THING_IDS)


@dataclasses.dataclass
class Case:
  y_true: dict
  y_pred: dict  # Arrays; auxiliary outputs as a list of dicts.
  stride: int


def make_case(seed: int, batch: int = 2, out_size: int = 9, stride: int = 4,
              max_thing_id: int = 16, num_slots: int = 12,
              feature_dim: int = 8, num_aux: int = 0,
              num_things: int = 4) -> Case:
  """Random ground truth (stuff bands, thing boxes, void, crowd) + noise."""
  rng = np.random.default_rng(seed)
  size = stride * (out_size - 1) + 1
  semantic = np.zeros([batch, size, size], np.int32)
  thing_id = np.full([batch, size, size], -1, np.int32)
  thing_class = np.full([batch, max_thing_id], -1, np.int32)
  for b in range(batch):
    bands = rng.choice(STUFF_IDS, size=3, replace=False)
    cuts = np.sort(rng.choice(np.arange(4, size - 4), 2, replace=False))
    semantic[b, :cuts[0]] = bands[0]
    semantic[b, cuts[0]:cuts[1]] = bands[1]
    semantic[b, cuts[1]:] = bands[2]
    semantic[b, :, :3] = IGNORE_LABEL  # A void band.
    for instance in range(num_things):
      y, x = rng.integers(0, size - 6, 2)
      h, w = rng.integers(5, size // 2, 2)
      cls = int(rng.choice(THING_IDS))
      semantic[b, y:y + h, x:x + w] = cls
      thing_id[b, y:y + h, x:x + w] = instance
      thing_class[b, instance] = cls
    # A crowd-like region: a thing class without an instance id.
    semantic[b, -5:, -5:] = THING_IDS[0]
    thing_id[b, -5:, -5:] = -1
  # Instances fully painted over by later ones are simply absent.
  for b in range(batch):
    present = set(np.unique(thing_id[b])) - {-1}
    for instance in range(num_things):
      if instance not in present:
        thing_class[b, instance] = -1

  def output():
    feature = rng.standard_normal([batch, out_size, out_size, feature_dim])
    feature /= np.linalg.norm(feature, axis=-1, keepdims=True)
    return {
        'pixel_space_mask_logits': rng.standard_normal(
            [batch, out_size, out_size, num_slots]).astype(np.float32),
        'transformer_class_logits': 2 * rng.standard_normal(
            [batch, num_slots, NUM_CLASSES]).astype(np.float32),
        'pixel_space_normalized_feature': feature.astype(np.float32),
    }

  y_pred = output()
  y_pred['semantic_logits'] = rng.standard_normal(
      [batch, out_size, out_size, NUM_CLASSES]).astype(np.float32)
  if num_aux:
    y_pred['auxiliary_outputs_pred'] = [output() for _ in range(num_aux)]
  y_true = {
      'semantic_gt': semantic,
      'thing_id_mask_gt': thing_id,
      'thing_id_class_gt': thing_class,
      'semantic_loss_weight': rng.uniform(
          0.5, 2.0, [batch, size, size]).astype(np.float32),
  }
  return Case(y_true=y_true, y_pred=y_pred, stride=stride)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_losses(case: Case, alpha=0.75, pq_weight=3.0, mask_id_weight=0.3,
                     instance_weight=1.0, temperature=0.3,
                     semantic_weight=1.0):
  """Per-example losses of the final output (float64, exact matching).

  Instance discrimination is the pixel-contrastive form with every pixel
  sampled, so it does not depend on the sampling order.
  """
  s = case.stride
  classes = THING_IDS + STUFF_IDS
  pred = {k: np.asarray(v, np.float64) for k, v in case.y_pred.items()
          if k != 'auxiliary_outputs_pred'}
  batch = pred['pixel_space_mask_logits'].shape[0]
  num_slots = pred['pixel_space_mask_logits'].shape[-1]
  losses = {k: [] for k in ['pq_style_loss_class_term',
                            'pq_style_loss_mask_dice_term',
                            'mask_id_cross_entropy_loss',
                            'instance_discrimination_loss', 'semantic_loss']}
  for b in range(batch):
    sem = case.y_true['semantic_gt'][b, ::s, ::s].ravel()
    tid = case.y_true['thing_id_mask_gt'][b, ::s, ::s].ravel()
    weight = case.y_true['semantic_loss_weight'][b, ::s, ::s].ravel()
    num_pixels = sem.size
    # Mask rows: every possible thing id, then every stuff class.
    rows = [(tid == t, case.y_true['thing_id_class_gt'][b, t])
            for t in range(case.y_true['thing_id_class_gt'].shape[1])]
    rows += [(sem == c, c) for c in STUFF_IDS]
    valid = [g for g, (m, c) in enumerate(rows) if m.any() and c >= 0]
    pixel_row = np.full(num_pixels, -1)
    for g in valid:
      pixel_row[rows[g][0]] = g
    non_void = sem != IGNORE_LABEL

    probs = _softmax(pred['pixel_space_mask_logits'][b].reshape(
        num_pixels, num_slots))
    class_probs = _softmax(pred['transformer_class_logits'][b])

    def dice(g, slot):
      gt, p = rows[g][0], probs[:, slot] * non_void
      return (gt * p).sum() / ((gt.sum() + p.sum()) / 2 + 1e-5)

    cost = np.array([[-dice(g, k) * class_probs[k, classes.index(rows[g][1])]
                      for k in range(num_slots)] for g in valid])
    matched_rows, matched_slots = optimize.linear_sum_assignment(cost)
    slot_of = {valid[r]: k for r, k in zip(matched_rows, matched_slots)}
    row_of = {k: g for g, k in slot_of.items()}

    # PQ-style class term.
    terms = []
    for k in range(num_slots):
      if k in row_of:
        g = row_of[k]
        target, a = classes.index(rows[g][1]), alpha
        w = max(dice(g, k), 1e-5)
      else:
        target, a = len(classes), 1 - alpha
        in_void = (probs[:, k] * ~non_void).sum()
        w = max(in_void / (probs[:, k].sum() + 1e-5), 1e-5)
      terms.append(a * w * -np.log(class_probs[k, target]))
    losses['pq_style_loss_class_term'].append(pq_weight * np.mean(terms))

    # PQ-style dice term, measured on labelled pixels.
    labelled = pixel_row >= 0
    total = 0.0
    for g, k in slot_of.items():
      gt, p = rows[g][0], probs[:, k] * labelled
      dice_loss = 1 - (2 * (gt * p).sum() + 1) / (gt.sum() + p.sum() + 1)
      total += dice_loss * max(class_probs[k, classes.index(rows[g][1])], 1e-5)
    losses['pq_style_loss_mask_dice_term'].append(
        pq_weight * alpha / num_slots * total)

    # Mask-ID cross-entropy over labelled, non-void pixels.
    ce = [-np.log(probs[p, slot_of[pixel_row[p]]])
          for p in range(num_pixels) if labelled[p] and non_void[p]]
    losses['mask_id_cross_entropy_loss'].append(mask_id_weight * np.mean(ce))

    # Pixel-contrastive instance discrimination over all pixels.
    feature = pred['pixel_space_normalized_feature'][b].reshape(num_pixels, -1)
    logits = feature @ feature.T / temperature
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True))
                                .sum(1, keepdims=True)) - logits.max(
                                    1, keepdims=True)
    row_losses = []
    for p in range(num_pixels):
      if pixel_row[p] < 0:
        continue
      same = (pixel_row == pixel_row[p]).astype(np.float64)
      row_losses.append(-(same / same.sum() * log_probs[p]).sum())
    losses['instance_discrimination_loss'].append(
        instance_weight * np.mean(row_losses))

    # Semantic cross-entropy, weighted, over non-void pixels.
    sem_probs = _softmax(pred['semantic_logits'][b].reshape(num_pixels, -1))
    sem_ce = [-np.log(sem_probs[p, sem[p]]) * weight[p]
              for p in range(num_pixels) if non_void[p]]
    losses['semantic_loss'].append(semantic_weight * np.mean(sem_ce))
  return {k: np.array(v) for k, v in losses.items()}
