"""The optimizer of the official recipe: AdamW with PyTorch's defaults and the linear warmup/decay schedule.

PyTorch's ``AdamW(params, lr)`` defaults are betas (0.9, 0.999), eps 1e-8, weight decay 0.01 applied to
every parameter (biases and LayerNorm included, as the official code does); Keras' defaults differ
(epsilon 1e-7, weight decay 0.004), so every value is set here explicitly. Gradient clipping is done by the
trainer after the cross-replica sum (Keras' ``global_clipnorm`` would clip each replica's gradients
separately under ``tf.distribute``).

Example::

    optimizer = build_optimizer(hparams, total_steps=epochs * steps_per_epoch)
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from custom_train_objects.schedules import LinearWarmupDecay  # noqa: E402


def build_optimizer(hparams, total_steps):
    """``keras.optimizers.AdamW`` over `LinearWarmupDecay`; wrapped for loss scaling under mixed_float16."""
    schedule = LinearWarmupDecay(hparams.lr, hparams.warmup_steps, total_steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=hparams.weight_decay,
                                       beta_1=hparams.beta_1, beta_2=hparams.beta_2, epsilon=hparams.epsilon)
    if hparams.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
