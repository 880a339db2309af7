"""What a traced graph is made of: tests that check which ops a layer runs
(a fused kernel taken, a gather avoided) read op types through here."""

from typing import Set

import tensorflow as tf


def op_types(graph: tf.Graph) -> Set[str]:
  return {op.type for op in graph.get_operations()}


def traced_op_types(fn, *args) -> Set[str]:
  """Op types of the graph `tf.function(fn)` traces for `args`."""
  return op_types(tf.function(fn).get_concrete_function(*args).graph)
