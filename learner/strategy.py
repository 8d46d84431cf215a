"""Picks the `tf.distribute` strategy the learner trains under."""

from absl import logging
import tensorflow as tf
from tf_agents.train.utils import strategy_utils

from common.errors import UserError
from common.errors import one_line


def split_cpu(num_devices: int) -> None:
  """Splits the physical CPU into `num_devices` logical devices.

  Must run before TensorFlow initializes its devices (before any op).
  """
  if num_devices <= 1:
    return
  cpus = tf.config.list_physical_devices('CPU')
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(name: str, tpu: str = '') -> tf.distribute.Strategy:
  """default: one device; mirrored: all GPUs, else all logical CPUs; tpu."""
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    gpus = tf.config.list_logical_devices('GPU')
    devices = [d.name for d in gpus] or [
        d.name for d in tf.config.list_logical_devices('CPU')]
    logging.info('MirroredStrategy over %s', devices)
    return tf.distribute.MirroredStrategy(devices=devices)
  if name == 'tpu':
    if not tpu:
      raise UserError('--strategy=tpu needs --tpu_address=<TPU name or address>')
    try:
      return strategy_utils.get_strategy(tpu=tpu, use_gpu=False)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'cannot connect to TPU {tpu!r}: {one_line(e)}'
                      ) from None
  raise UserError(f'unknown --strategy={name!r}; use default, mirrored or tpu')
