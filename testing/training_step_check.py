"""Our trainer against the official ClipCap training step, from the same weights on the same batches.

`compare_training_steps` builds an official ``ClipCaptionModel`` (or ``ClipCaptionPrefix`` for
``--only_prefix``) with random weights and GPT-2 dropout 0, converts it to Keras, trains both for one epoch
of N batches (no shuffling) and compares every weight afterwards through the official state dict
(`utils.convert.clipcap_export`):

- PyTorch: the official ``train()`` body (`testing.clipcap_official.official_train_steps`): attention mask
  over prefix + tokens, logits ``[:, K-1:-1]``, ``cross_entropy(ignore_index=0)`` on tokens padded with 0,
  transformers' AdamW (written out in the reference: transformers 5 no longer ships it) at its defaults,
  ``get_linear_schedule_with_warmup``, ``optimizer.step(); scheduler.step()``;
- Keras: `custom_train_objects.trainer.Trainer` with the default optimizer hyper-parameters.

The data avoids the two deliberate differences: no caption token has id 0 (the official loss ignores it),
and captions of one image share one embedding (the official code encodes the image once per caption, which
gives the same embedding). Captions end with the stop token, so our trainer appends nothing. Used by
``unitest/test_training_fidelity.py`` (tiny models) and ``benchmarks/check_training_step.py`` (GPT-2 124M).
"""

import numpy as np
import torch

from testing import clipcap_official as ref
from testing.tiny_models import SAMPLE_TEXT

CAPTIONS = [
    *SAMPLE_TEXT,
    "A blue square.",
    "Two cats on a table next to a plate of food.",
    "A man and a dog in the park near the station.",
    "A yellow circle on a red background next to a green square.",
]
IMAGE_INDEX = [0, 0, 1, 2, 3, 3, 4, 5, 1, 4, 5, 2]  # 6 images, 2 captions each, not in image order


def compare_training_steps(kind, prefix_only, tokenizer, work_dir, size="tiny", batch_size=4, lr=1e-3,
                           warmup_steps=1, normalize=False, seed=0, hparams_overrides=None, float64_reference=False):
    """Train the official model and ours for ``len(CAPTIONS) // batch_size`` steps from the same weights.

    Returns a dict: ``mapper_diff`` / ``gpt_diff`` (max |ours - official| over the mapper's / GPT-2's
    weights after the steps), ``mapper_moved`` / ``gpt_moved`` (max |official after - before|: the steps
    did something), ``ours_gpt_moved`` (the same for our GPT-2), ``losses`` (ours, official), ``steps``,
    ``max_length``, ``keys`` (the official keys compared), ``worst_key`` (where the largest difference is),
    ``state_dicts`` (official-format weights before, after the official steps, after ours). With
    ``float64_reference``, the official steps also run in float64 and ``ours_vs_64`` / ``official_vs_64``
    give each float32 side's max distance to that reference (which side is nearer exact arithmetic).
    """
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
    from custom_train_objects.trainer import Trainer
    from datasets.caption_dataset import CaptionDataset
    from hparams.training import TrainingHParams
    from loggers.training_loggers import LoggerList
    from models.image_captioning.clip_cap import ClipCap
    from utils.convert.clipcap import load_clipcap
    from utils.convert.clipcap_export import official_state_dict

    cls = ref.ClipCaptionPrefix if prefix_only else ref.ClipCaptionModel
    official = ref.build_random_clipcap(kind, size=size, seed=seed, dropout=0.0, cls=cls)
    before = {k: v.detach().clone() for k, v in official.state_dict().items()}
    mapper, gpt2, config = load_clipcap(before, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    config.update(normalize_prefix=normalize)
    model = ClipCap(ClipCapBackbone(mapper, gpt2, normalize_prefix=normalize), tokenizer, jit_compile=False,
                    info={"name": "step_check"})
    k = int(config["prefix_length"])

    # the data: official tokenization (no stop token appended), no token id 0, one embedding per image
    token_lists = [tokenizer.encode(c) for c in CAPTIONS]
    stop = tokenizer.encode(".")
    assert len(stop) == 1 and all(t[-1] == stop[0] for t in token_lists), "captions must end with the stop token"
    assert all(0 not in t for t in token_lists), "token id 0 is ignored by the official loss: not in this data"
    embeddings = np.random.default_rng(seed).normal(0.0, 0.5, size=(max(IMAGE_INDEX) + 1, config["prefix_size"]))
    embeddings = embeddings.astype(np.float32)
    dataset = CaptionDataset([f"image_{i}.jpg" for i in range(len(embeddings))], list(range(len(embeddings))),
                             CAPTIONS, IMAGE_INDEX, name="step_check")

    hp = dict(lr=lr, warmup_steps=warmup_steps, batch_size=batch_size, epochs=1, prefix_length=k,
              mapping_type=kind, normalize=normalize, prefix_only=prefix_only, shuffle=False, log_every=1000)
    if kind == "transformer":
        hp.update(clip_length=int(config["clip_length"]), num_layers=int(config["num_layers"]))
    hparams = TrainingHParams(**{**hp, **(hparams_overrides or {})})
    trainer = Trainer(model, hparams, work_dir, loggers=LoggerList([]), progress=False)
    ours_gpt_before = [v.numpy().copy() for v in model.gpt2.weights]
    ours_losses = trainer.fit(dataset, embeddings)["loss"]

    # the official side: ClipCocoDataset's padding and prefixes, DataLoader(shuffle=False, drop_last=True)
    max_seq_len = ref.official_max_seq_len(token_lists)
    assert max_seq_len == trainer.max_length, (max_seq_len, trainer.max_length)
    tokens, mask = ref.official_pad_tokens(token_lists, max_seq_len, k)
    prefixes = torch.from_numpy(embeddings[IMAGE_INDEX])
    if normalize:
        prefixes = prefixes / prefixes.norm(2, -1, keepdim=True)
    steps = len(CAPTIONS) // batch_size
    batches = [tuple(x[i * batch_size : (i + 1) * batch_size] for x in (tokens, mask, prefixes))
               for i in range(steps)]
    official_losses = ref.official_train_steps(official, batches, lr=lr, warmup_steps=warmup_steps,
                                               total_steps=steps, prefix_length=k)

    result = {}
    if float64_reference:
        exact = ref.build_random_clipcap(kind, size=size, seed=seed, dropout=0.0, cls=cls)
        assert all(torch.equal(v, before[key]) for key, v in exact.state_dict().items())
        exact = exact.double()
        ref.official_train_steps(exact, [(t, m.double(), p.double()) for t, m, p in batches], lr=lr,
                                 warmup_steps=warmup_steps, total_steps=steps, prefix_length=k, dtype=torch.float64)
        result["state_dicts_64"] = exact.state_dict()

    after = official.state_dict()
    ours = official_state_dict(model.mapper, model.gpt2, model.config)
    assert list(ours) == list(after), "the export does not produce the official keys"

    def diffs(a, b, keys):
        return {key: float((a[key].double() - b[key].double()).abs().max()) for key in keys}

    def max_diff(a, b, keys):
        return max(diffs(a, b, keys).values())

    mapper_keys = [key for key in after if key.startswith("clip_project.")]
    gpt_keys = [key for key in after if key.startswith("gpt.")]
    ours_gpt_moved = max(float(np.abs(b - v.numpy()).max()) for b, v in zip(ours_gpt_before, model.gpt2.weights))
    if float64_reference:
        exact = result["state_dicts_64"]
        result["ours_vs_64"] = max_diff(ours, exact, list(after))
        result["official_vs_64"] = max_diff(after, exact, list(after))
    return {
        **result,
        "mapper_diff": max_diff(ours, after, mapper_keys),
        "gpt_diff": max_diff(ours, after, gpt_keys),
        "mapper_moved": max_diff(after, before, mapper_keys),
        "gpt_moved": max_diff(after, before, gpt_keys),
        "ours_gpt_moved": ours_gpt_moved,
        "losses": (ours_losses, official_losses),
        "steps": steps,
        "max_length": max_seq_len,
        "keys": list(after),
        "worst_key": max((d, key) for key, d in diffs(ours, after, list(after)).items())[1],
        "state_dicts": {"before": before, "official": after, "ours": ours},
    }
