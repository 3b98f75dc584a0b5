"""Train a ClipCap on CLIP embeddings: prefix-only or full fine-tuning, exact resume, ``tf.distribute``.

Modes (``hparams.prefix_only``):

- full fine-tuning (the official default): mapper and GPT-2 trained, GPT-2 in training mode (dropout on);
- prefix-only (the official ``--only_prefix``): only the mapper is trained; GPT-2 runs in inference mode
  (dropout off), gradients flow through it to the prefix, and its weights are never updated (bit-identical).

The trainer works on copies of the model's mapper and GPT-2 built inside the strategy's scope and under the
mixed-precision policy (variables stay float32), and writes their values back into the `ClipCap` when
training ends, so the result is a normal ClipCap (``model.save`` / ``ClipCap.load`` / ``predict``).

Each step: per replica, the loss is the sum of the token cross-entropies divided by the number of real
tokens in the *global* batch; gradients are summed across replicas, optionally clipped by their global norm
(after the sum: the norm of the true gradient), then AdamW applies them with the warmup/decay schedule.

Checkpoints (``<output_dir>/checkpoints/ckpt-<step>/``: ``model.weights.h5``, the backbone's weights in the
saved-model format; ``training_state.npz``, every optimizer variable and the dropout seed states, in order;
``state.json``, the epoch, batch position, step and loss history) are written atomically at the end of every
``save_every`` epochs and every ``checkpoint_every_steps`` steps; the final ``model/`` is a saved ClipCap
(format 2). Checkpoints of the previous layout (one ``variables.npz``) are still resumed from. ``fit`` resumes from the latest
one: batches come in an order fixed by (seed, epoch), so a resumed run computes exactly the losses of an
uninterrupted one. Each file and the folder are fsync'ed before the folder is renamed into place. ``state.json``
also records the training data (`data_fingerprint`: caption count, steps per epoch, the embeddings' CLIP
``model_id``, a SHA-256 of the tokens, mask, image index and embeddings; the same of the validation set, if
any): a resume on other data, or with another validation set, is refused,
naming what differs (checkpoints written before it was recorded resume unchecked, said in the log). A latest
checkpoint that cannot be read (`DamagedCheckpoint`: truncated, emptied) is skipped for the previous one, said in
the log.

Non-finite values: each compiled step also returns four flags, computed next to the loss (one
``is_finite`` reduction over the summed gradients, one over the trained weights after the update: no extra
host transfer). ``fit`` raises `TrainingDiverged` naming the step at the first step whose loss is NaN/inf,
whose gradients are NaN/inf, or after which a trained weight is NaN/inf. Under ``mixed_float16`` the
`LossScaleOptimizer` itself skips a step whose float16 gradients overflowed and halves its scale (from 2**15;
it doubles again after 2000 clean steps): such a skip is dynamic loss scaling at work, not a failure, while the
scale is above `MIN_LOSS_SCALE` (1, DeepSpeed's ``min_loss_scale`` default); an overflow with the scale at or
below it is the gradients' own and stops the run (Keras would otherwise halve the scale forever, to 0, and then
apply 0/0). A non-finite *loss* is always a failure (float16 activations overflowed in the forward pass: no
scale fixes that). No checkpoint is written from the failing step on (the writers check every weight and
optimizer variable again, on the host, and refuse; the older, finite checkpoints stay), no model is saved
(`finalize` checks too), and a checkpoint holding NaN/inf (an older trainer's) is refused on resume. Resuming
a diverged run repeats the same steps (it is deterministic): change the hyper-parameters in a new folder.

Example::

    model = build_clipcap_for_training(hp, prefix_size=512, tokenizer="gpt2", gpt2="gpt2", clip=clip)
    trainer = Trainer(model, hp, "runs/coco", strategy=tf.distribute.MirroredStrategy())
    history = trainer.fit(dataset, embeddings, val_dataset=val, val_embeddings=val_embeddings)
    model.save("pretrained_models/my_clipcap")       # also saved to runs/coco/model/ by fit
"""

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from custom_architectures.quantization import check_trainable
from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
from custom_layers.linear import IN_OUT
from custom_layers.packed_weights import weights_frozen
from custom_train_objects.checkpoints import (  # noqa: F401 (is_checkpoint: its historical place)
    STATE_FILENAME,
    DamagedCheckpoint,
    is_checkpoint,
    list_checkpoints,
    non_finite_variables,
    restore_variables,
    sync_checkpoint,
    sync_folder,
    write_variables,
)
from custom_train_objects.losses import caption_loss_sum
from custom_train_objects.optimizers import build_optimizer
from datasets.tf_dataset import caption_batches, encode_captions, num_batches
from hparams.training import TrainingHParams, is_hparams_file
from loggers.training_loggers import LoggerList, build_loggers
from utils.file_utils import (
    UnsafePathError,
    check_overwritable,
    check_replaceable,
    describe_kind,
    publish_dir,
    read_json,
    recover_replacements,
    remove_dir,
    staging_dir,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# hyper-parameters that may change when resuming (they do not change the computation)
RESUME_MUTABLE = {"save_every", "checkpoint_every_steps", "log_every", "jit_compile"}


# below this loss scale, gradients that overflow are the gradients' own, not the scaling's: a failure
MIN_LOSS_SCALE = 1.0
# what the train step reports besides the loss, each summed over the replicas (> 0: that happened)
STEP_FLAGS = ("loss", "gradients", "weights", "skipped")


def _summed_over_replicas(strategy, replica_fn):
    """A `tf.function` of a batch: ``replica_fn(*batch)`` on every replica of ``strategy``, each of its two
    outputs summed over the replicas (the training step's loss and flags, the evaluation's sums)."""

    @tf.function
    def step(batch):
        first, second = strategy.run(replica_fn, args=batch)
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, first, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, second, axis=None))

    return step


class TrainingStopped(Exception):
    """Raised by `Trainer.fit` when ``stop_after_steps`` is reached (a checkpoint was written)."""


class TrainingDiverged(RuntimeError):
    """Raised by `Trainer.fit` at the first step whose loss, gradients or updated weights are not finite (and
    by the checkpoint and model writers, which never write non-finite weights). ``step``: that step."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


def _all_finite(tensors):
    """One boolean: no NaN or infinity in any of ``tensors`` (variables or gradients; None skipped)."""
    flags = [tf.reduce_all(tf.math.is_finite(t.value if hasattr(t, "value") else t))
             for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


@contextlib.contextmanager
def _dtype_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _clone(model, policy):
    """A fresh instance of ``model`` (same config, ``policy`` for its computations), same values."""
    config = model.get_config()
    config["dtype"] = policy or "float32"
    with _dtype_policy(policy):
        clone = type(model).from_config(config)
    _copy_values(model.variables, clone.variables, what=model.name)
    return clone


def _copy_values(source, target, what="model"):
    if len(source) != len(target):
        raise RuntimeError(f"{what}: {len(source)} variables vs {len(target)} in its copy")
    for s, t in zip(source, target):
        if tuple(s.shape) != tuple(t.shape):
            raise RuntimeError(f"{what}: variable {s.path} {tuple(s.shape)} vs {t.path} {tuple(t.shape)}")
        t.assign(s.value if hasattr(s, "value") else s)


def _worker_subdir(strategy):
    """Where a process writes under ``output_dir``: "" for the chief (or one process), ``worker-<i>`` for the
    other workers of a multi-worker strategy.

    Every worker holds the same state and writes the same checkpoints, logs and model: given one ``--output``
    on a shared file system they would overwrite each other's files, so the chief writes to ``output_dir``
    and worker i to ``output_dir/worker-<i>`` (where each resumes from).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None:
        return ""
    task_id = int(resolver.task_id or 0)
    has_chief = bool(resolver.cluster_spec().as_dict().get("chief"))
    if task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief):
        return ""
    return f"{task_type}-{task_id}"


def check_output_dir(path):
    """``path`` as a run folder: absent (with no file among its parents) or a folder; `UnsafePathError`
    otherwise, before any work (a file there would only fail when the first log or checkpoint is written)."""
    path = Path(path)
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                where = "is" if p == path else f"is under {p}, which is"
                raise UnsafePathError(f"the output folder {path} {where} {_kind(p)}, not a folder: choose "
                                      "another --output (nothing was changed)")
            break
    return path


def _arrays_sha256(tokens, mask, image_index, embeddings):
    h = hashlib.sha256()
    for name, array in (("tokens", tokens), ("mask", mask), ("image_index", image_index),
                        ("embeddings", embeddings)):
        array = np.ascontiguousarray(np.asarray(array))
        h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def data_fingerprint(tokens, mask, image_index, embeddings, steps_per_epoch, model_id="", val=None):
    """What identifies the training data of a run, recorded in its checkpoints: the caption count, the steps per
    epoch, the embeddings' CLIP ``model_id`` ("" when unknown) and a SHA-256 over the token array, the mask,
    the image index and the embeddings (dtype, shape and bytes of each; well under a second for COCO).
    ``val``: the validation data ``(embeddings, image_index, tokens, mask)`` or None, recorded as ``val``
    (its caption count and SHA-256, or None): the history's ``val_loss`` of every epoch is over the same set."""
    fingerprint = {"captions": int(len(tokens)), "steps_per_epoch": int(steps_per_epoch),
                   "model_id": str(model_id or ""), "sha256": _arrays_sha256(tokens, mask, image_index, embeddings)}
    if val is not None:
        val_embeddings, val_index, val_tokens, val_mask = val
        val = {"captions": int(len(val_tokens)),
               "sha256": _arrays_sha256(val_tokens, val_mask, val_index, val_embeddings)}
    return {**fingerprint, "val": val}


def data_differences(saved, current):
    """How the data fingerprint ``current`` differs from ``saved`` (a list of phrases; empty: the same data). A
    ``model_id`` is compared only when both are known CLIP ids of one recipe (`same_id_scheme`; the content's
    SHA-256 covers the embeddings themselves)."""
    from custom_train_objects.model_factory import same_id_scheme

    differ = [f"{key.replace('_', ' ')} {saved.get(key)!r} there, {current[key]!r} now"
              for key in ("captions", "steps_per_epoch") if saved.get(key) != current[key]]
    if same_id_scheme(saved.get("model_id"), current["model_id"]) and saved["model_id"] != current["model_id"]:
        differ.append(f"embeddings of CLIP {saved['model_id'][:17]}... there, {current['model_id'][:17]}... now")
    if saved.get("sha256") != current["sha256"]:
        differ.append("their content (SHA-256 of the tokens, mask, image index and embeddings)")
    if "val" in saved and saved["val"] != current.get("val"):  # recorded since validation sets are
        def described(val):
            return (f"{val.get('captions')} captions (SHA-256 {str(val.get('sha256'))[:12]}...)"
                    if isinstance(val, dict) else "none")
        differ.append(f"the validation data ({described(saved['val'])} there, {described(current.get('val'))} "
                      "now: every epoch's val_loss must be over the same set)")
    return differ


def _kind(path):
    try:
        return describe_kind(path.stat().st_mode)
    except OSError:
        return "a dangling or looping symbolic link"


class Trainer:
    """Train ``model`` (a `ClipCap`: ``mapper``, ``gpt2``, ``tokenizer``, ``config``) with ``hparams``.

    Args:
        model: the ClipCap to train; its mapper and GPT-2 receive the trained values when `fit` ends.
        hparams: a `TrainingHParams`.
        output_dir: checkpoints, logs (CSV, TensorBoard), ``hparams.json`` and the final ``model/`` (the
            non-chief workers of a multi-worker strategy write to ``output_dir/worker-<i>``).
        strategy: a ``tf.distribute`` strategy (``MirroredStrategy`` for several GPUs,
            ``MultiWorkerMirroredStrategy`` for several hosts); None: the default (one device).
        loggers: a `LoggerList` (default: console + CSV + TensorBoard in ``output_dir``).
        progress: show tqdm bars.
        keep_checkpoints: how many of the latest checkpoints to keep.
    """

    def __init__(self, model, hparams: TrainingHParams, output_dir, strategy=None, loggers=None, progress=True,
                 keep_checkpoints=2):
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self.output_dir = check_output_dir(Path(output_dir) / _worker_subdir(self.strategy))  # before any work
        check_trainable(model.gpt2)  # int8 weights (precision="int8") are inference only: a clear error now
        if weights_frozen(model.gpt2) or weights_frozen(model.mapper):  # not at the end, when fit writes them
            raise ValueError(f"this model runs in {model.precision}, its weights fixed at load (an inference "
                             "twin): train the float32 model (ClipCap.load(name) without precision)")
        self.hp = self._with_stop_token(model, hparams)
        self.progress = progress
        self.keep_checkpoints = max(1, int(keep_checkpoints))
        self.loggers = loggers if loggers is not None else build_loggers(self.output_dir, progress=progress)
        self.prefix_length = int(model.config["prefix_length"])
        self.normalize = bool(hparams.normalize)
        if bool(model.config.get("normalize_prefix", False)) != self.normalize:
            logger.info("normalize_prefix of the model set to %s (hparams.normalize)", self.normalize)
        self.history = {"loss": [], "epochs": []}
        self.max_length = None
        self.data_fingerprint = None  # of the data `fit` trains on (`data_fingerprint`), written in checkpoints
        self._built = False

    @staticmethod
    def _with_stop_token(model, hparams):
        """``hparams`` with the stop token the captions end with: the model's unless they name one, which then
        becomes the model's (checked against its tokenizer now, not at the first batch: `TokenizerError`).
        The checkpoints and hparams.json record the one used."""
        if hparams.stop_token is None:
            return hparams.replace(stop_token=model.stop_token)
        if hparams.stop_token != model.stop_token:
            model.stop_token = hparams.stop_token
        return hparams

    # ------------------------------------------------------------------------------------------ building
    def _build(self, steps_per_epoch):
        hp = self.hp
        policy = hp.mixed_precision
        with self.strategy.scope():
            self.mapper = _clone(self.model.mapper, policy)
            self.gpt2 = _clone(self.model.gpt2, policy)
            # float32 itself (only the L2 normalisation), the policy is its children's
            self.backbone = ClipCapBackbone(self.mapper, self.gpt2, normalize_prefix=self.normalize)
            self.trainable = list(self.mapper.trainable_variables)
            if not hp.prefix_only:
                self.trainable += list(self.gpt2.trainable_variables)
            self.optimizer = build_optimizer(hp, total_steps=hp.epochs * steps_per_epoch)
            self.optimizer.build(self.trainable)
        self._train_step = self._make_train_step()
        self._eval_step = self._make_eval_step()
        self._built = True

    def _forward(self, embeddings, tokens, mask, training):
        """The backbone's forward (as inference); prefix-only keeps GPT-2 without dropout (the mappers have
        none), as the official ``ClipCaptionPrefix``."""
        return self.backbone(embeddings, tokens, padding_mask=mask, training=training and not self.hp.prefix_only)

    def _make_train_step(self):
        hp, strategy, k = self.hp, self.strategy, self.prefix_length
        optimizer, trainable = self.optimizer, self.trainable
        replicas = strategy.num_replicas_in_sync
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def grads_fn(embeddings, tokens, mask, global_count):
            with tf.GradientTape() as tape:
                logits = self._forward(embeddings, tokens, mask, training=True)
                loss_sum, _ = caption_loss_sum(logits, tokens, mask, k)
                loss = loss_sum / global_count  # this replica's share of the global mean
                scaled = optimizer.scale_loss(loss)
            return loss, tape.gradient(scaled, trainable)

        grads_fn = tf.function(grads_fn, jit_compile=hp.jit_compile)

        def replica_step(embeddings, tokens, mask):
            ctx = tf.distribute.get_replica_context()
            count = tf.reduce_sum(tf.cast(mask[:, k:], tf.float32))
            global_count = tf.maximum(ctx.all_reduce(tf.distribute.ReduceOp.SUM, count), 1.0)
            loss, grads = grads_fn(embeddings, tokens, mask, global_count)
            if replicas > 1:
                grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            grads_finite = _all_finite(grads)  # the summed gradients: the same on every replica
            if loss_scaled:  # an overflow while the scale is > MIN_LOSS_SCALE: the optimizer skips the step
                skipped = tf.logical_and(tf.logical_not(grads_finite),
                                         tf.cast(optimizer.dynamic_scale, tf.float32) > MIN_LOSS_SCALE)
            else:
                skipped = tf.constant(False)
            if hp.gradient_clip_norm is not None:
                clip = hp.gradient_clip_norm
                if loss_scaled:  # the gradients are still multiplied by the loss scale
                    clip = clip * tf.cast(optimizer.dynamic_scale, tf.float32)
                grads, _ = tf.clip_by_global_norm(grads, clip)
            if replicas > 1:  # Keras sums the replicas' gradients again: give it 1/R of the sum each
                grads = [g / replicas for g in grads]
            optimizer.apply(grads, trainable)
            failed = [tf.logical_not(tf.math.is_finite(loss)),
                      tf.logical_not(tf.logical_or(grads_finite, skipped)),
                      tf.logical_not(_all_finite(trainable))]  # read after the update (program order)
            return loss, tf.cast(tf.stack(failed + [skipped]), tf.float32)

        return _summed_over_replicas(strategy, replica_step)  # (loss, flags)

    def _make_eval_step(self):
        strategy, k = self.strategy, self.prefix_length

        def replica_eval(embeddings, tokens, mask):
            logits = self._forward(embeddings, tokens, mask, training=False)
            return caption_loss_sum(logits, tokens, mask, k)

        return _summed_over_replicas(strategy, replica_eval)  # (loss sum, token count)

    # ---------------------------------------------------------------------------------------------- data
    def encode(self, dataset, max_length=None):
        """(tokens, mask) of a dataset's captions with the model's tokenizer."""
        return encode_captions(self.model.tokenizer, dataset.captions, self.prefix_length,
                               max_length=max_length, stop_token=self.hp.stop_token,
                               append_stop=self.hp.append_stop)

    def _check_inputs(self, dataset, embeddings):
        embeddings = np.asarray(embeddings, np.float32)
        prefix_size = int(self.model.config["prefix_size"])
        if embeddings.ndim != 2 or embeddings.shape[1] != prefix_size:
            raise ValueError(f"embeddings must be (N_images, {prefix_size}) for this mapper, got {embeddings.shape}")
        if len(embeddings) != dataset.num_images:
            raise ValueError(f"{len(embeddings)} embeddings for {dataset.num_images} images of {dataset.name}")
        return embeddings

    # ------------------------------------------------------------------------------------------- fitting
    def fit(self, dataset, embeddings, val_dataset=None, val_embeddings=None, resume=True, stop_after_steps=None,
            embeddings_model_id=""):
        """Train for ``hparams.epochs`` epochs (resuming from the latest checkpoint when ``resume``).

        Args:
            dataset: a `CaptionDataset`; embeddings: its (N_images, D) CLIP embeddings.
            val_dataset / val_embeddings: optional, for a validation loss after every epoch.
            resume: continue from the latest checkpoint in ``output_dir`` (hyper-parameters must match).
            stop_after_steps: write a checkpoint and raise `TrainingStopped` after this many steps in
                total (to test or to split a run into jobs).
            embeddings_model_id: the CLIP ``model_id`` of ``embeddings`` (their file's metadata), recorded in the
                checkpoints with the data's fingerprint; a resume on other data is refused.

        Returns:
            the history: ``{"loss": [per-step loss], "epochs": [{"epoch", "loss", "val_loss", ...}]}``.
        """
        hp = self.hp
        embeddings = self._check_inputs(dataset, embeddings)
        tokens, mask = self.encode(dataset, hp.max_length)
        max_length = self.max_length = int(tokens.shape[1])
        n_positions = int(self.model.gpt2.n_positions)
        if self.prefix_length + max_length > n_positions:
            raise ValueError(f"prefix ({self.prefix_length}) + captions ({max_length} tokens) exceed GPT-2's "
                             f"{n_positions} positions: set max_length")
        global_batch = hp.batch_size
        replicas = self.strategy.num_replicas_in_sync
        if global_batch % replicas:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {replicas} replicas")
        steps_per_epoch = num_batches(len(tokens), global_batch)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(tokens)} captions make no full batch of {global_batch}")
        val = None
        if val_dataset is not None:
            val_embeddings = self._check_inputs(val_dataset, val_embeddings)
            val = (val_embeddings, val_dataset.image_index, *self.encode(val_dataset, max_length))
        self.data_fingerprint = data_fingerprint(tokens, mask, dataset.image_index, embeddings, steps_per_epoch,
                                                 embeddings_model_id, val=val)

        from utils.model_store import is_saved_model

        check_replaceable(self.model_dir(), is_saved_model)  # refuse now, not after training
        check_overwritable(self.output_dir / "hparams.json", is_hparams_file, "a hyper-parameter file")
        keras.utils.set_random_seed(hp.seed)
        if not self._built:
            self._build(steps_per_epoch)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {"epoch": 0, "batch": 0, "step": 0, "loss": [], "epochs": [], "max_length": max_length}
        latest, restored = self._resume(max_length) if resume else (None, None)
        if latest is not None:
            state = restored
            self.loggers.resume(state["step"])
            logger.info("resumed from %s (epoch %d, batch %d, step %d)", latest, state["epoch"] + 1,
                        state["batch"], state["step"])
        elif not resume and self.latest_checkpoint() is not None:
            raise ValueError(f"{self.output_dir} already holds checkpoints: resume, or use another directory")
        else:  # from step 0: rows of a run killed before its first checkpoint would be repeated otherwise
            self.loggers.resume(0)
        hp.save(self.output_dir / "hparams.json")
        self.history = {"loss": list(state["loss"]), "epochs": list(state["epochs"])}
        self.loggers.begin({"captions": len(tokens), "images": len(embeddings), "max_length": max_length,
                            "steps_per_epoch": steps_per_epoch, "replicas": replicas,
                            "mode": "prefix-only" if hp.prefix_only else "full fine-tuning"})
        console = self.loggers.console() if isinstance(self.loggers, LoggerList) else None

        step = state["step"]
        for epoch in range(state["epoch"], hp.epochs):
            first = state["batch"] if epoch == state["epoch"] else 0
            ds = caption_batches(embeddings, dataset.image_index, tokens, mask, global_batch, seed=hp.seed,
                                 epoch=epoch, shuffle=hp.shuffle, skip_batches=first)
            ds = self.strategy.experimental_distribute_dataset(ds)
            if console is not None:
                console.start_epoch(epoch, steps_per_epoch, initial=first)
            start = time.perf_counter()
            for batch_index, batch in enumerate(ds, start=first):
                # the rate this update uses: the schedule at the optimizer's iterations before it
                lr = self._lr() if (step + 1) % hp.log_every == 0 else None
                loss, flags = self._train_step(batch)
                loss = float(loss)
                step += 1
                self._check_step(flags.numpy(), step, epoch, batch_index, console)
                self.history["loss"].append(loss)
                if console is not None:
                    console.advance(loss)
                if step % hp.log_every == 0:
                    self.loggers.log_step(step, {"epoch": epoch + 1, "loss": loss, "lr": lr})
                if batch_index + 1 == steps_per_epoch:
                    break  # the end of the epoch: bookkeeping (and a step checkpoint falling here) below
                stop = stop_after_steps is not None and step >= stop_after_steps
                if stop or (hp.checkpoint_every_steps and step % hp.checkpoint_every_steps == 0):
                    self._save_checkpoint(epoch, batch_index + 1, step)
                if stop:
                    if console is not None:
                        console.close()
                    raise TrainingStopped(f"stopped after {step} steps (checkpoint written)")
            record = {"epoch": epoch + 1, "step": step, "seconds": round(time.perf_counter() - start, 3)}
            this_epoch = self.history["loss"][epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
            if this_epoch:  # the whole epoch's mean, also when it was resumed in the middle
                record["loss"] = float(np.mean(this_epoch))
            if val is not None:
                record["val_loss"] = self.evaluate_loss(*val)
            self.history["epochs"].append(record)
            self.loggers.log_epoch(epoch, record)
            stop = stop_after_steps is not None and step >= stop_after_steps and epoch + 1 < hp.epochs
            every_steps = bool(hp.checkpoint_every_steps) and step % hp.checkpoint_every_steps == 0
            if (epoch + 1) % hp.save_every == 0 or epoch + 1 == hp.epochs or stop or every_steps:
                self._save_checkpoint(epoch + 1, 0, step)
            if stop:
                raise TrainingStopped(f"stopped after {step} steps, at the end of epoch {epoch + 1} "
                                      "(checkpoint written)")
        self.loggers.close()
        self.finalize()
        return self.history

    def _check_step(self, flags, step, epoch, batch_index, console):
        """Stop (`TrainingDiverged`) when the step just run had a non-finite loss, non-finite gradients (beyond
        the loss scale's own skipping) or left non-finite weights; note a loss-scale skip."""
        failed = dict(zip(STEP_FLAGS, flags > 0))
        if failed["skipped"] and not any(failed[k] for k in STEP_FLAGS[:3]):
            logger.info("step %d: the float16 gradients overflowed: step skipped, loss scale lowered to %s "
                        "(dynamic loss scaling)", step, float(self.optimizer.dynamic_scale))
            return
        if failed["loss"]:
            what = "the loss is not finite (NaN or infinity)"
        elif failed["gradients"]:
            what = "the gradients hold NaN or infinity" + (
                f" with the loss scale already at or below {MIN_LOSS_SCALE:g} (an overflow of the gradients "
                "themselves, not of the scaling)" if hasattr(self.optimizer, "dynamic_scale") else "")
        elif failed["weights"]:
            what = "the update left NaN or infinite weights"
        else:
            return
        if console is not None:
            console.close()
        self.loggers.close()
        latest = self.latest_checkpoint()
        kept = (f"the last checkpoint, {latest.name}, holds finite weights" if latest is not None
                else "no checkpoint was written")
        raise TrainingDiverged(
            f"training stopped at step {step} (epoch {epoch + 1}, batch {batch_index + 1}): {what}. Nothing of "
            f"this step was saved and no model was written; {kept}. Resuming repeats the same steps (the run is "
            "deterministic): lower the learning rate or clip the gradients (--gradient-clip-norm) in a new "
            "output folder", step)

    def evaluate_loss(self, embeddings, image_index, tokens, mask, batch_size=None):
        """Mean cross-entropy per real caption token (no dropout) over a whole split."""
        batch_size = batch_size or self.hp.batch_size
        ds = caption_batches(embeddings, image_index, tokens, mask, batch_size, shuffle=False,
                             drop_remainder=self.strategy.num_replicas_in_sync > 1)
        total = count = 0.0
        for batch in self.strategy.experimental_distribute_dataset(ds):
            t, c = self._eval_step(batch)
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    def _lr(self):
        """The learning rate of the optimizer's next update (read it before the step to log what the step
        used: after it, the schedule has moved one step on)."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        return float(optimizer.learning_rate)

    def finalize(self):
        """Copy the trained values into the ClipCap, save it to ``<output_dir>/model``; returns the model.

        ``<output_dir>/model`` is replaced only when it is a saved ClipCap (a previous run's), never another
        folder (`utils.file_utils.UnsafePathError`; `fit` checks this before training)."""
        bad = non_finite_variables(self.mapper.variables + self.gpt2.variables)
        if bad:
            raise TrainingDiverged(f"not saving the trained model: {', '.join(bad)} hold NaN or infinity", None)
        _copy_values(self.mapper.variables, self.model.mapper.variables, "mapper")
        _copy_values(self.gpt2.variables, self.model.gpt2.variables, "gpt2")
        self.model.forget_identity()  # new weights: the identity recorded at load no longer holds
        self.model.normalize_prefix = self.normalize
        # a new folder renamed into place; an existing output_dir/model is replaced only if it is a saved model
        self.model.save(self.model_dir(), overwrite=True)
        return self.model

    def model_dir(self):
        return self.output_dir / "model"

    # --------------------------------------------------------------------------------------- checkpoints
    def _variable_groups(self):
        """The previous checkpoint layout's groups (`variables.npz`)."""
        return {"mapper": self.mapper.variables, "gpt2": self.gpt2.variables,
                "optimizer": self.optimizer.variables}

    def checkpoint_dir(self):
        return self.output_dir / CHECKPOINT_DIR

    def latest_checkpoint(self):
        """The newest complete checkpoint directory (one with its state.json), or None."""
        done = self._checkpoints()
        return done[-1] if done else None

    def _save_checkpoint(self, epoch, batch, step):
        """Write ``checkpoints/ckpt-<step>`` atomically (a new uniquely named folder renamed into place) and
        delete the oldest checkpoints beyond ``keep_checkpoints``: only folders that are checkpoints of ours."""
        bad = non_finite_variables(self.backbone.weights + list(self.optimizer.variables))
        if bad:  # never replace a good checkpoint with one that cannot be resumed from
            raise TrainingDiverged(f"not writing the checkpoint of step {step}: {', '.join(bad)} hold NaN or "
                                   "infinity", step)
        root = self.checkpoint_dir()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"ckpt-{step:09d}"
        with staging_dir(final) as staging:
            self._write_checkpoint(staging, epoch, batch, step)
            sync_checkpoint(staging)  # every file and the folder on disk before the rename publishes them
            publish_dir(staging, final, is_ours=is_checkpoint, overwrite=True)
        sync_folder(root)  # the rename itself
        for old in self._checkpoints()[: -self.keep_checkpoints]:
            remove_dir(old)  # renamed aside and marked first: a kill half-way leaves nothing anonymous
        logger.info("checkpoint %s (epoch %d, batch %d)", final, epoch, batch)
        return final

    def _checkpoints(self):
        recover_replacements(self.checkpoint_dir())  # what a killed run left: staged or half-deleted checkpoints
        return list_checkpoints(self.checkpoint_dir())

    def _write_checkpoint(self, staging, epoch, batch, step):
        shapes = write_variables(staging, self.backbone, self.optimizer)
        state = {"epoch": epoch, "batch": batch, "step": step, "max_length": self.max_length,
                 "hparams": self.hp.to_dict(), "loss": self.history["loss"], "epochs": self.history["epochs"],
                 "shapes": shapes, "gpt2_weights_layout": self.gpt2.get_config()["weights_layout"],
                 "data": self.data_fingerprint}
        with open(staging / STATE_FILENAME, "w") as f:
            json.dump(state, f)

    def _resume(self, max_length):
        """(checkpoint, its state) restored from the latest readable checkpoint, or (None, None) when there is
        none. A damaged one (`DamagedCheckpoint`) gives way to the previous one, said in the log; when none
        is left, the latest's error. Any other refusal (other hyper-parameters, other data) is raised."""
        checkpoints = self._checkpoints()
        first_error = None
        for i, directory in enumerate(reversed(checkpoints)):
            try:
                return directory, self._restore(directory, max_length)
            except DamagedCheckpoint as e:
                first_error = first_error or e
                earlier = checkpoints[-(i + 2)] if i + 1 < len(checkpoints) else None
                if earlier is not None:
                    logger.warning("%s; resuming from the previous checkpoint, %s, instead", e, earlier.name)
        if first_error is not None:
            raise DamagedCheckpoint(f"{first_error}; no earlier checkpoint could be read either: move the damaged "
                                    "checkpoints out of checkpoints/ to start over") from first_error
        return None, None

    def _restore(self, directory, max_length):
        try:
            state = read_json(Path(directory) / STATE_FILENAME, 64 << 20)  # bounded, depth-limited
            saved = state["hparams"]
            if not isinstance(saved, dict):
                raise TypeError(f"hparams is {type(saved).__name__}")
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated, emptied, not ours
            raise DamagedCheckpoint(f"cannot resume from {directory}: its {STATE_FILENAME} cannot be read "
                                    f"({type(e).__name__}: {e}): damaged") from e
        current = self.hp.to_dict()
        differ = sorted(k for k in current if k not in RESUME_MUTABLE and saved.get(k) != current[k])
        if differ:
            raise ValueError(f"cannot resume from {directory}: hyper-parameters differ: "
                             + ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in differ))
        if state.get("max_length") != max_length:
            raise ValueError(f"cannot resume from {directory}: captions padded to {state.get('max_length')} "
                             f"tokens there, {max_length} now (different data?)")
        saved_data = state.get("data")
        if not isinstance(saved_data, dict):
            logger.info("%s was written before checkpoints recorded their training data: resuming without "
                        "checking that the data are the same", directory)
        elif self.data_fingerprint is not None:
            differ = data_differences(saved_data, self.data_fingerprint)
            if differ:
                raise ValueError(f"cannot resume from {directory}: the training data differ: " + "; ".join(differ)
                                 + " (resume on the data that run was trained on, or use another --output)")
        layout = self.gpt2.get_config()["weights_layout"]
        if state.get("gpt2_weights_layout", IN_OUT) != layout:  # absent: written before GPT-2's kernels were (out, in)
            raise ValueError(f"cannot resume from {directory}: its GPT-2 projection kernels (and their optimizer "
                             f"moments) are stored {state.get('gpt2_weights_layout', IN_OUT)!r}, this version trains "
                             f"them {layout!r} (torch's nn.Linear layout); finish that run with the version that "
                             "started it, or start a new run from its saved model (saved models load in either layout)")
        restore_variables(directory, self.backbone, self.optimizer, self._variable_groups())
        bad = non_finite_variables(self.backbone.weights + list(self.optimizer.variables))
        if bad:  # written before the trainer checked: resuming would only propagate them
            raise ValueError(f"cannot resume from {directory}: {', '.join(bad)} hold NaN or infinity; move that "
                             "folder out of checkpoints/ to resume from an earlier checkpoint")
        return state
