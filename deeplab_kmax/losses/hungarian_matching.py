"""Minimum-cost bipartite matching (linear sum assignment) inside the graph.

kMaX-DeepLab's PQ-style loss matches ground-truth masks to mask slots with the
Hungarian algorithm at every training step. Running it in the TF graph keeps
the whole loss on the accelerator (TPU included), so the matcher must compile
with XLA: static shapes, `tf.while_loop`s and no host callbacks.

Two solvers share one contract (row -> column index, -1 for none):

* `linear_sum_assignment`: exact. The shortest-augmenting-path form of the
  Hungarian algorithm with row/column potentials (Jonker-Volgenant style):
  workers are inserted one at a time and each insertion runs a Dijkstra
  search over reduced costs, vectorised over jobs and over the batch. Every
  search step fixes one more job, so a search ends after at most `jobs + 1`
  steps and the whole solve after `workers` searches; it cannot stall on
  floating-point round-off. Only rows flagged valid take part, so void /
  padded ground-truth masks stay out of the arithmetic instead of being
  marked with huge sentinel costs.
* `deeplab2_assignment`: DeepLab2's float32 cover-based (Munkres) matcher,
  reproduced step for step so that its choice among matchings that tie after
  rounding is reproduced too (see the section below). Slower, the default of
  the loss for bit-compatibility.
"""

from typing import NamedTuple, Optional

import tensorflow as tf


def _set_at(tensor: tf.Tensor, index: tf.Tensor, value: tf.Tensor,
            enabled: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Writes value[b] to tensor[b, index[b]] (where enabled[b])."""
  depth = tensor.shape[1]
  if depth is None:
    depth = tf.shape(tensor)[1]
  hit = tf.one_hot(index, depth, on_value=True, off_value=False)
  if enabled is not None:
    hit &= enabled[:, tf.newaxis]
  value = tf.cast(value, tensor.dtype)
  if value.shape.rank == 1:
    value = value[:, tf.newaxis]
  return tf.where(hit, value, tensor)


def _batch_size(tensor: tf.Tensor):
  """Static batch size when known, so loop-carried shapes stay consistent."""
  return tensor.shape[0] if tensor.shape[0] is not None else tf.shape(tensor)[0]


def _pick(tensor: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Returns tensor[b, index[b]] for a [B, L] tensor."""
  return tf.gather(tensor, index[:, tf.newaxis], batch_dims=1)[:, 0]


def _assign_workers(costs: tf.Tensor, worker_active: tf.Tensor,
                    job_allowed: tf.Tensor) -> tf.Tensor:
  """Assigns every active worker a distinct allowed job at minimum total cost.

  Requires, per example, no more active workers than allowed jobs.

  Args:
    costs: [B, K, K] float, cost of worker (row) i doing job (column) j.
    worker_active: [B, K] bool, the workers that must be assigned.
    job_allowed: [B, K] bool, the jobs that may be used.

  Returns:
    [B, K] int32: the worker holding each job, or -1.
  """
  batch = _batch_size(costs)
  k = costs.shape[-1]
  dtype = costs.dtype
  inf = tf.constant(float('inf'), dtype)
  # Index 0 of both axes is a dummy: job 0 anchors each search, worker 0 means
  # "nobody". Real workers and jobs are 1..K.
  costs = tf.pad(costs, [[0, 0], [1, 0], [1, 0]])
  allowed = tf.pad(job_allowed, [[0, 0], [1, 0]])  # Dummy job never allowed.
  # Active workers first, in index order, so the outer loop can stop early.
  order = tf.argsort(tf.cast(~worker_active, tf.int32), axis=1, stable=True)
  order = tf.cast(order, tf.int32) + 1
  num_active = tf.reduce_sum(tf.cast(worker_active, tf.int32), axis=1)
  zeros = tf.zeros([batch, k + 1], dtype)
  no_index = tf.zeros([batch], tf.int32)

  def insert_worker(step, owner, u, v):
    worker = order[:, step]  # [B]
    inserting = step < num_active  # [B]
    owner = _set_at(owner, no_index, worker)
    false_row = tf.zeros([batch, k + 1], tf.bool)
    state = (
        no_index,  # Job at the search frontier.
        tf.fill([batch, k + 1], inf),  # Slack: best reduced cost per job.
        tf.zeros([batch, k + 1], tf.int32),  # Previous job on the best path.
        _set_at(false_row, no_index, True),  # Jobs in the search tree.
        _set_at(false_row, worker, True),  # Workers in the search tree.
        u, v, inserting)

    def search_step(job, slack, parent, tree_jobs, tree_workers, u, v,
                    searching):
      row = _pick(owner, job)
      reduced = (tf.gather(costs, row[:, tf.newaxis], batch_dims=1)[:, 0] -
                 _pick(u, row)[:, tf.newaxis] - v)  # [B, K+1]
      free = ~tree_jobs & allowed
      improves = free & (reduced < slack)
      new_slack = tf.where(improves, reduced, slack)
      new_parent = tf.where(improves, job[:, tf.newaxis], parent)
      candidates = tf.where(free, new_slack, inf)
      next_job = tf.argmin(candidates, axis=1, output_type=tf.int32)
      delta = tf.reduce_min(candidates, axis=1)[:, tf.newaxis]
      # Shift potentials so the tree stays tight and the new edge becomes so.
      new_u = tf.where(tree_workers, u + delta, u)
      new_v = tf.where(tree_jobs, v - delta, v)
      new_slack = tf.where(free, new_slack - delta, new_slack)
      next_owner = _pick(owner, next_job)
      new_tree_jobs = _set_at(tree_jobs, next_job, True)
      new_tree_workers = _set_at(tree_workers, next_owner, True)
      keep = searching[:, tf.newaxis]
      return (tf.where(searching, next_job, job),
              tf.where(keep, new_slack, slack),
              tf.where(keep, new_parent, parent),
              tf.where(keep, new_tree_jobs, tree_jobs),
              tf.where(keep, new_tree_workers, tree_workers),
              tf.where(keep, new_u, u),
              tf.where(keep, new_v, v),
              searching & (next_owner != 0) & tf.math.is_finite(delta[:, 0]))

    (job, _, parent, _, _, u, v, _) = tf.while_loop(
        lambda *s: tf.reduce_any(s[-1]), search_step, state,
        maximum_iterations=k + 1)

    # Flip the alternating path that ends at the free job just reached.
    def flip_step(job, owner, moving):
      previous = _pick(parent, job)
      owner = _set_at(owner, job, _pick(owner, previous), moving)
      job = tf.where(moving, previous, job)
      return job, owner, moving & (job != 0)

    _, owner, _ = tf.while_loop(
        lambda *s: tf.reduce_any(s[-1]), flip_step,
        (job, owner, inserting & (job != 0)), maximum_iterations=k + 1)
    return step + 1, owner, u, v

  _, owner, _, _ = tf.while_loop(
      lambda step, *_: step < tf.reduce_max(num_active), insert_worker,
      (tf.constant(0), tf.zeros([batch, k + 1], tf.int32), zeros, zeros))
  return owner[:, 1:] - 1


def linear_sum_assignment(costs: tf.Tensor,
                          row_mask: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Batched minimum-cost matching of rows to columns, like scipy's.

  For each example, the valid rows (all rows when `row_mask` is None) are
  matched to columns so that min(#valid rows, #columns) pairs are formed, no
  row or column is used twice, and the summed cost of the pairs is minimal.
  This is `scipy.optimize.linear_sum_assignment` on the valid rows. Ties may
  be broken differently, but the total cost is optimal.

  Args:
    costs: [B, N, M] float tensor; N and M must be static.
    row_mask: Optional [B, N] bool tensor of rows that take part.

  Returns:
    [B, N] int32: the column matched to each row, -1 for rows left unmatched
    (invalid rows, or surplus rows when there are more valid rows than
    columns).

  Raises:
    ValueError: if `costs` is not a rank-3 tensor with static N and M.
  """
  costs = tf.convert_to_tensor(costs)
  if not costs.dtype.is_floating:
    costs = tf.cast(costs, tf.float32)
  if costs.shape.rank != 3 or None in costs.shape[1:]:
    raise ValueError('linear_sum_assignment expects costs of shape [batch, N, '
                     f'M] with static N and M, got {costs.shape}.')
  num_rows, num_cols = costs.shape[1], costs.shape[2]
  batch = _batch_size(costs)
  if row_mask is None:
    row_mask = tf.ones([batch, num_rows], tf.bool)
  row_mask = tf.cast(row_mask, tf.bool)
  size = max(num_rows, num_cols)
  square = tf.pad(costs, [[0, 0], [0, size - num_rows], [0, size - num_cols]])
  rows_valid = tf.pad(row_mask, [[0, 0], [0, size - num_rows]])
  cols_real = tf.tile(tf.range(size)[tf.newaxis] < num_cols, [batch, 1])

  # Rows are workers unless there are more valid rows than columns; then the
  # columns become the workers and only valid rows are allowed as jobs.
  if num_rows > num_cols:
    transpose = tf.reduce_sum(tf.cast(row_mask, tf.int32), 1) > num_cols
  else:
    transpose = tf.zeros([batch], tf.bool)
  flip = transpose[:, tf.newaxis]
  owner = _assign_workers(
      tf.where(flip[..., tf.newaxis], tf.transpose(square, [0, 2, 1]), square),
      worker_active=tf.where(flip, cols_real, rows_valid),
      job_allowed=tf.where(flip, rows_valid, cols_real))  # [B, size]

  # owner[b, job] = worker. Turn it into row -> column for both orientations.
  pairs = tf.one_hot(owner, size, on_value=True, off_value=False)  # [B, j, w]
  pairs = tf.where(flip[..., tf.newaxis], pairs,
                   tf.transpose(pairs, [0, 2, 1]))  # [B, row, col]
  pairs = pairs[:, :num_rows, :num_cols]
  column = tf.argmax(tf.cast(pairs, tf.int32), axis=-1, output_type=tf.int32)
  return tf.where(tf.reduce_any(pairs, axis=-1), column, -1)


def assignment_cost(costs: tf.Tensor, assignment: tf.Tensor) -> tf.Tensor:
  """Sums costs[b, i, assignment[b, i]] over matched rows; returns [B]."""
  picked = tf.gather(costs, tf.maximum(assignment, 0)[..., tf.newaxis],
                     batch_dims=2)[..., 0]
  return tf.reduce_sum(tf.where(assignment >= 0, picked, 0), axis=-1)




# ---------------------------------------------------------------------------
# DeepLab2-equivalent matcher.
#
# DeepLab2 pads its [B, G, S] matching weights to a square with -999 and marks
# void rows with +999, then runs a cover-based (Munkres) Hungarian algorithm in
# float32 that tests reduced costs for exact zeros. Because every row is first
# reduced by its minimum (-999), the ~1e-3 mask costs are rounded at a float32
# ulp of ~6e-5, so several matchings tie and DeepLab2's tie-breaking decides.
# The functions below re-implement that algorithm's arithmetic and
# tie-breaking so that the same matching (and hence the same losses) comes
# out; `linear_sum_assignment` above is the exact alternative.
# ---------------------------------------------------------------------------

_PAD_COST = -999.0


def _first_true(mask: tf.Tensor, axis: int = -1) -> tf.Tensor:
  """Index of the first True along axis (0 when there is none)."""
  return tf.argmax(tf.cast(mask, tf.int32), axis=axis, output_type=tf.int32)


def _greedy_matching(tight: tf.Tensor) -> tf.Tensor:
  """Rows in order take their first still-free tight column: [B, n, n] bool."""
  n = tight.shape[-1]
  by_row = tf.transpose(tight, [1, 0, 2])  # [n, B, n]

  def take(row, taken_and_rows):
    taken, rows = taken_and_rows
    free = by_row[row] & ~taken  # [B, n]
    pick = tf.one_hot(_first_true(free), n, on_value=True,
                      off_value=False) & free
    return row + 1, (taken | pick, rows.write(row, pick))

  _, (_, rows) = tf.while_loop(
      lambda row, _: row < n, take,
      (0, (tf.zeros_like(by_row[0]), tf.TensorArray(tf.bool, size=n))))
  return tf.transpose(rows.stack(), [1, 0, 2])


class _Tree(NamedTuple):
  """Alternating-path search result; ids are 1-based, 0 = not reached."""
  job_label: tf.Tensor  # [B, n] root (free worker) label that reached a job.
  job_parent: tf.Tensor  # [B, n] worker through which the job was reached.
  worker_label: tf.Tensor  # [B, n] root label that reached a worker.
  worker_parent: tf.Tensor  # [B, n] job through which the worker was reached.
  free_job_reached: tf.Tensor  # [B, n] bool, unmatched jobs reached.


def _alternating_tree(matched: tf.Tensor, tight: tf.Tensor) -> _Tree:
  """Layered search from the free workers along tight, alternating edges.

  Each layer labels newly reached jobs with the largest root label among the
  workers that reach them (parent: first such worker) and then the workers
  matched to those jobs.
  """
  shape = tf.shape(matched)
  n = matched.shape[-1]
  free_workers = ~tf.reduce_any(matched, axis=2)  # [B, n]
  free_jobs = ~tf.reduce_any(matched, axis=1)
  open_edges = tf.cast(tight & ~matched, tf.int32)
  match_edges = tf.cast(matched, tf.int32)
  ids = tf.range(1, n + 1, dtype=tf.int32)[tf.newaxis]
  roots = ids * tf.cast(free_workers, tf.int32)  # [B, n]
  zeros = tf.zeros(shape[:2], tf.int32)

  def grow(frontier, job_label, job_parent, worker_label, worker_parent):
    via_open = frontier[:, :, tf.newaxis] * open_edges  # [B, worker, job]
    reach_job = tf.reduce_max(via_open, axis=1)
    reach_job = tf.where(job_label > 0, 0, reach_job)
    new_job_parent = tf.where(
        reach_job > 0,
        1 + tf.argmax(via_open, axis=1, output_type=tf.int32), 0)
    via_match = reach_job[:, tf.newaxis, :] * match_edges
    reach_worker = tf.reduce_max(via_match, axis=2)
    reach_worker = tf.where(worker_label > 0, 0, reach_worker)
    new_worker_parent = tf.where(
        reach_worker > 0,
        1 + tf.argmax(via_match, axis=2, output_type=tf.int32), 0)
    return (reach_worker,
            tf.maximum(job_label, reach_job),
            tf.maximum(job_parent, new_job_parent),
            tf.maximum(worker_label, reach_worker),
            tf.maximum(worker_parent, new_worker_parent))

  _, job_label, job_parent, worker_label, worker_parent = tf.while_loop(
      lambda frontier, *_: tf.reduce_sum(frontier) > 0, grow,
      (roots, zeros, zeros, roots, zeros))
  return _Tree(job_label, job_parent, worker_label, worker_parent,
               (job_label > 0) & free_jobs)


def _augment_first_path(matched: tf.Tensor, tree: _Tree) -> tf.Tensor:
  """Flips the alternating path ending at the first reached free job."""
  n = matched.shape[-1]
  job = _first_true(tree.free_job_reached)
  active = _pick(tree.free_job_reached, job)

  def edge(worker, job):
    rows = tf.one_hot(worker, n, on_value=True, off_value=False)
    cols = tf.one_hot(job, n, on_value=True, off_value=False)
    return rows[:, :, tf.newaxis] & cols[:, tf.newaxis, :]

  def back(flips, active, job):
    worker = tf.maximum(_pick(tree.job_parent, job) - 1, 0)
    flips |= edge(worker, job) & active[:, tf.newaxis, tf.newaxis]
    previous = _pick(tree.worker_parent, worker) - 1
    active &= previous >= 0
    job = tf.maximum(previous, 0)
    flips |= edge(worker, job) & active[:, tf.newaxis, tf.newaxis]
    return flips, active, job

  flips, _, _ = tf.while_loop(lambda _, active, __: tf.reduce_any(active),
                              back, (tf.zeros_like(matched), active, job))
  return matched ^ flips


def _maximum_matching(tight: tf.Tensor, matched: tf.Tensor):
  """Grows `matched` one augmenting path at a time until none is left.

  Returns:
    (final search tree, maximum matching).
  """

  def augment(tree, matched):
    matched = _augment_first_path(matched, tree)
    return _alternating_tree(matched, tight), matched

  return tf.while_loop(lambda tree, _: tf.reduce_any(tree.free_job_reached),
                       augment, (_alternating_tree(matched, tight), matched))


def _koenig_cover(tree: _Tree, matched: tf.Tensor):
  """Minimum vertex cover of the tight graph from the final search tree."""
  rows = tf.reduce_any(matched, axis=2) & (tree.worker_label <= 0)
  cols = tf.reduce_any(matched, axis=1) & (tree.job_label > 0)
  return rows, cols


def _shift_by_cover(costs: tf.Tensor, rows: tf.Tensor,
                    cols: tf.Tensor) -> tf.Tensor:
  """Subtracts the smallest uncovered cost from uncovered entries and adds it
  to doubly covered ones."""
  rows, cols = rows[:, :, tf.newaxis], cols[:, tf.newaxis, :]
  covered, doubly = rows | cols, rows & cols
  fill = tf.reduce_max(costs)  # Over the whole batch, as DeepLab2 does.
  smallest = tf.reduce_min(tf.where(covered, fill, costs), axis=[1, 2],
                           keepdims=True)
  zero = tf.zeros_like(costs)
  return (costs + tf.where(doubly, smallest + zero, zero) -
          tf.where(covered, zero, smallest + zero))


def deeplab2_square_matching(costs: tf.Tensor) -> tf.Tensor:
  """DeepLab2's float32 Hungarian matching of a [B, n, n] cost matrix.

  Returns:
    [B, n, n] bool permutation matrices (rows: workers, columns: jobs).
  """
  costs = tf.convert_to_tensor(costs, tf.float32)
  n = costs.shape[-1]
  costs -= tf.reduce_min(costs, axis=2, keepdims=True)
  costs -= tf.reduce_min(costs, axis=1, keepdims=True)
  tight = tf.equal(costs, 0.0)
  tree, matched = _maximum_matching(tight, _greedy_matching(tight))
  rows, cols = _koenig_cover(tree, matched)
  total = _batch_size(costs) * n

  def incomplete(rows, cols, *_):
    return (tf.reduce_sum(tf.cast(rows, tf.int32)) +
            tf.reduce_sum(tf.cast(cols, tf.int32))) < total

  def refine(rows, cols, costs, matched):
    costs = _shift_by_cover(costs, rows, cols)
    tree, matched = _maximum_matching(tf.equal(costs, 0.0), matched)
    rows, cols = _koenig_cover(tree, matched)
    return rows, cols, costs, matched

  _, _, _, matched = tf.while_loop(incomplete, refine,
                                   (rows, cols, costs, matched))
  return matched


def deeplab2_assignment(costs: tf.Tensor,
                        row_mask: Optional[tf.Tensor] = None) -> tf.Tensor:
  """`linear_sum_assignment`'s contract, solved the way DeepLab2 does.

  Invalid rows get DeepLab2's sentinel (+999 when rows outnumber columns,
  else -999), the matrix is padded to a square with -999 and solved by
  `deeplab2_square_matching`. Reproduces DeepLab2's matching, including its
  choice among matchings that tie after float32 rounding.

  Returns:
    [B, N] int32 column per row, -1 for invalid or unmatched rows.
  """
  costs = tf.cast(tf.convert_to_tensor(costs), tf.float32)
  num_rows, num_cols = costs.shape[1], costs.shape[2]
  if row_mask is not None:
    valid = tf.cast(row_mask, tf.float32)[..., tf.newaxis]
    sentinel = -_PAD_COST if num_rows > num_cols else _PAD_COST
    costs = costs * valid + (1.0 - valid) * sentinel
  size = max(num_rows, num_cols)
  square = tf.pad(costs, [[0, 0], [0, size - num_rows], [0, size - num_cols]],
                  constant_values=_PAD_COST)
  pairs = deeplab2_square_matching(square)[:, :num_rows, :num_cols]
  column = _first_true(pairs)
  matched = tf.reduce_any(pairs, axis=-1)
  if row_mask is not None:
    matched &= tf.cast(row_mask, tf.bool)
  return tf.where(matched, column, -1)
