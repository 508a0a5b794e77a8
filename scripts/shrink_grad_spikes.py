"""How far the memory shrinkage's exact gradient strays from the masked one, step by step.

    python scripts/shrink_grad_spikes.py --config configs/mvtec.py \
        --config.data.root=workdirs/synthetic_benchmark --config.data.category=brick \
        --config.model.backbone=resnet18 --config.data.image_size=128 \
        --config.train.batch_size=8 --config.seed=3 [--steps 120] [--train_with exact]

Trains a run from scratch on the config's training images (msrd_jax.train's loss, data
order and optimizer), differentiating the shrinkage as --train_with says, and writes
nothing. Before each step it computes, at the same parameters and batch, the gradient
with model.memory.shrink_grad 'exact' and with 'masked' (memory.hard_shrink), and prints
|g_exact - g_masked| / |g_masked| over all parameters and over the memory's slots, for
every step where it exceeds 1 % and every tenth step, then a summary. The two differ only
in the term w eps / (w - lambda + eps)^2 of the exact derivative, which is negligible
unless w is within about 1e-6 of the threshold lambda. Figures are printed, never
asserted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from msrd_jax import config as config_lib
from msrd_jax import memory, teacher, train
from msrd_jax.model import MSRD

config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_integer('steps', 120, 'Training steps to compare the gradients at.')
flags.DEFINE_enum('train_with', 'exact', ['exact', 'masked'], 'The gradient training follows.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def _relative(a, b) -> float:
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)) / optax.tree.norm(b))


def _loss_only(loss_fn):
  return lambda *args: loss_fn(*args)[0]


def _near_threshold(model, c, state, teacher_vars, images) -> str:
  """How close the softmax read weights (before the shrinkage) lie to its threshold."""
  _, _, aux, _ = model.apply_train(teacher_vars, state.params, state.batch_stats, images)
  slots = state.params['memory']['memory']
  query = aux['query'].reshape(-1, slots.shape[-1]).astype(jnp.float32)
  w = np.asarray(memory.read_weights(query, slots, c.model.memory.temperature, 0.0))
  lam = memory.threshold(c.model.memory.shrink, slots.shape[0])
  rel = np.abs(w - lam) / lam
  return (
    f'the read weights w lie at a median |w - lambda| / lambda of {np.median(rel):.3f}; '
    f'{(rel < 0.03).mean():.0%} within 3 % of lambda = {lam:.4g}'
  )


def main(argv) -> None:
  del argv
  c = FLAGS.config.copy_and_resolve_references()
  c.model.memory.shrink_grad = FLAGS.train_with
  config_lib.validate(c)
  if c.model.memory.mode == 'off':
    raise SystemExit('model.memory.mode is off: there is no shrinkage to differentiate')

  loader = train.make_loader(c, num_local_devices=1)
  teacher_vars = teacher.from_config(c)
  models = {}
  for grad in ('exact', 'masked'):
    cg = c.copy_and_resolve_references()
    cg.model.memory.shrink_grad = grad
    models[grad] = MSRD(cg)
  tx = train.make_optimizer(c)
  state = train.create_state(models[FLAGS.train_with], tx, teacher_vars, c)
  step = jax.jit(train.make_train_step(models[FLAGS.train_with], tx, c, axis_name=None))
  grads = {g: jax.jit(jax.grad(_loss_only(train.make_loss_fn(m, c)))) for g, m in models.items()}

  print(
    f'{c.data.category}, seed {c.seed}, training with the {FLAGS.train_with} gradient; '
    '|g_exact - g_masked| / |g_masked| (all parameters / memory slots):'
  )
  ratios = []
  batches = iter(loader)
  for i in range(FLAGS.steps):
    images = np.asarray(next(batches)['image'])
    images = jnp.asarray(images.reshape((-1,) + images.shape[-3:]))
    if i == 0:
      near = _near_threshold(models[FLAGS.train_with], c, state, teacher_vars, images)
      print(f'  at step 0, {near}')
    g = {k: fn(state.params, state.batch_stats, teacher_vars, images) for k, fn in grads.items()}
    total = _relative(g['exact'], g['masked'])
    slots = _relative(g['exact']['memory'], g['masked']['memory'])
    ratios.append(total)
    if total > 0.01 or i % 10 == 0:
      print(f'  step {i:4d}: {total:9.2e} / {slots:9.2e}', flush=True)
    state, _ = step(state, teacher_vars, images)
  r = np.asarray(ratios)
  print(
    f'{len(r)} steps: median {np.median(r):.2e}, above 1 %: {int((r > 0.01).sum())}, '
    f'above 50 %: {int((r > 0.5).sum())}, largest {r.max():.2e} (step {int(r.argmax())})'
  )


if __name__ == '__main__':
  app.run(main)
