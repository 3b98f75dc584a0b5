"""Learning-rate schedules: linear warmup then linear decay to 0 (the official ClipCap recipe).

Identical to ``transformers.get_linear_schedule_with_warmup`` as the official code steps it: the update at
optimizer step s (0-based) uses ``lr * s / warmup`` during warmup, then ``lr * (total - s) / (total - warmup)``
(never below 0). Keras evaluates the schedule at ``optimizer.iterations`` before each update, so step 0
uses a learning rate of 0, as PyTorch's first ``optimizer.step()`` does.

Example::

    schedule = LinearWarmupDecay(2e-5, warmup_steps=5000, total_steps=10 * steps_per_epoch)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule)
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="image_captioning")
class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``peak_lr * min(step / warmup, (total - step) / (total - warmup))``, clipped to [0, peak_lr]."""

    def __init__(self, peak_lr, warmup_steps, total_steps):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        up = step / warmup
        down = (self.total_steps - step) / float(max(self.total_steps - self.warmup_steps, 1))
        factor = ops.where(step < self.warmup_steps, up, ops.maximum(down, 0.0))
        return self.peak_lr * factor

    def get_config(self):
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
