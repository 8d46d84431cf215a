"""What the agent modules share: their networks' layers run in NumPy (for the
actors' collect policies) and the action-spec test each agent applies.

The agents import this module, never the package `common.agents` that
registers them (no import cycle).
"""

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from common import compat


class NumpyLayers:
  """Keras `Flatten` and `Dense` (relu or linear) layers run in NumPy.

  Holds the layers' variables and copies their values on `refresh()`.
  """

  def __init__(self, layers: Sequence[tf.keras.layers.Layer]):
    self._layers = list(layers)
    self._weights = []
    self.refresh()

  @staticmethod
  def supports(layers: Sequence[tf.keras.layers.Layer]) -> bool:
    for layer in layers:
      if isinstance(layer, tf.keras.layers.Flatten):
        continue
      if not isinstance(layer, tf.keras.layers.Dense):
        return False
      if getattr(layer.activation, '__name__', None) not in ('relu',
                                                             'linear'):
        return False
    return True

  def refresh(self) -> None:
    weights = []
    for layer in self._layers:
      if isinstance(layer, tf.keras.layers.Flatten):
        weights.append(None)
        continue
      bias = layer.bias.numpy() if layer.use_bias else None
      weights.append((layer.kernel.numpy(), bias,
                      layer.activation.__name__ == 'relu'))
    self._weights = weights

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    for weights in self._weights:
      if weights is None:
        x = x.reshape(x.shape[0], -1)
        continue
      kernel, bias, relu = weights
      x = x @ kernel
      if bias is not None:
        x += bias
      if relu:
        np.maximum(x, 0, out=x)
    return x


def encoder_layers(encoder) -> Optional[Sequence[tf.keras.layers.Layer]]:
  """The layers of a TF-Agents `EncodingNetwork` over one observation array.

  None where the encoder does more (preprocessing layers, a combiner).
  """
  layers = compat.encoder_postprocessing_layers(encoder)
  if (layers is None or
      len(tf.nest.flatten(encoder.input_tensor_spec)) != 1):
    return None
  return layers if NumpyLayers.supports(layers) else None


def has_discrete_actions(env) -> bool:
  return not all(tf.as_dtype(s.dtype).is_floating
                 for s in tf.nest.flatten(env.action_spec()))
