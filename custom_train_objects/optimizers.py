"""The optimizer of the official recipe: ``transformers.AdamW`` with its defaults, and the linear warmup/decay.

The official ``train.py`` builds ``AdamW(model.parameters(), lr=lr)`` with ``from transformers import AdamW``
(not ``torch.optim.AdamW``), so the official step is transformers' AdamW at its defaults: betas (0.9, 0.999),
**eps 1e-6, weight decay 0.0**, bias correction on, every parameter in one group. Its update, for a step t
(1-based) with gradient g and learning rate lr_t from the schedule::

    m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g^2
    p = p - lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)      # eps added to the uncorrected sqrt(v)
    p = p - lr_t * wd * p                                                  # only when wd > 0

Keras' ``Adam`` / ``AdamW`` compute exactly the first two lines (same epsilon placement, the bias corrections
folded into the step size), so the defaults in `hparams.training.TrainingHParams` (``epsilon=1e-6``,
``weight_decay=0.0``) reproduce the official step; ``unitest/test_training_fidelity.py`` checks it step by step
against the formula and against the whole official training step in PyTorch. Keras' defaults differ (epsilon
1e-7, weight decay 0.004), and so do ``torch.optim.AdamW``'s (eps 1e-8, weight decay 0.01): every value is
set here explicitly.

Weight decay > 0 (not the official recipe): Keras applies the decoupled decay **before** the Adam update,
``p = p * (1 - lr_t * wd) - adam_update`` (as ``torch.optim.AdamW`` does), transformers' AdamW applies it
**after**, ``p = (p - adam_update) * (1 - lr_t * wd)``. Both decay every parameter (biases and LayerNorms
included) with the scheduled learning rate; they differ by ``lr_t * wd * adam_update`` per step, a second-order
term (e.g. 2e-5 * 0.01 * 2e-5 = 4e-12 per step at lr 2e-5).

Gradient clipping is done by the trainer after the cross-replica sum (Keras' ``global_clipnorm`` would clip
each replica's gradients separately under ``tf.distribute``); the official code does not clip.

Example::

    optimizer = build_optimizer(hparams, total_steps=epochs * steps_per_epoch)
"""

import keras

from custom_train_objects.schedules import LinearWarmupDecay


def build_optimizer(hparams, total_steps):
    """``keras.optimizers.AdamW`` over `LinearWarmupDecay`; wrapped for loss scaling under mixed_float16."""
    schedule = LinearWarmupDecay(hparams.lr, hparams.warmup_steps, total_steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=hparams.weight_decay,
                                       beta_1=hparams.beta_1, beta_2=hparams.beta_2, epsilon=hparams.epsilon)
    if hparams.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
