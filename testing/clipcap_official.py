"""A PyTorch reference of the official ClipCap modules and decoders (rmokady/CLIP_prefix_caption).

Written from the published facts of the released implementation, to test the Keras port against:

- ``MLP``: Linear(prefix_size -> K*C/2) -> tanh -> Linear(-> K*C) (``clip_project.model.{0,2}``);
  the legacy single ``nn.Linear(prefix_size, K*C)`` used by older checkpoints with K > 10;
- ``TransformerMapper``: ``linear`` -> (L, C), concatenated with ``prefix_const`` (K, C), 8 pre-norm layers
  (8 heads, bias-free ``to_queries`` / ``to_keys_values``, ``project`` with bias, ReLU MLP of ratio 2),
  output = last K positions;
- ``ClipCaptionModel``: ``clip_project`` + ``gpt`` (transformers' ``GPT2LMHeadModel``), prefix first;
- ``generate2`` (top-p 0.8 filter then argmax, i.e. greedy) and ``generate_beam``, run the official way:
  one image at a time, no KV cache, the whole sequence recomputed at every step;
- training (``train.py``): ``ClipCaptionPrefix`` (``--only_prefix``), ``ClipCocoDataset``'s padding and
  ``max_seq_len``, ``transformers.AdamW`` of transformers 4.x (gone from transformers 5, so written out here)
  and the body of ``train()`` (`official_train_steps`).

Helpers build random models at the real and tiny sizes and save them as official-format ``.pt`` files
(``torch.save(model.state_dict())``), optionally with the transformers-4.11-era ``attn.bias`` /
``attn.masked_bias`` buffers.

Test-only code: it imports transformers' PyTorch GPT-2, so import it before TensorFlow.
"""

import math

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

# --------------------------------------------------------------------------------------------------- modules


class MLP(nn.Module):
    """The official ``MLP((prefix_size, K*C // 2, K*C))``: Linear -> tanh -> Linear."""

    def __init__(self, sizes, bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim, out_d=None, act=nnf.relu):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_self // num_heads
        self.scale = head_dim**-0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)

    def forward(self, x, y=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, _ = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)  # (B, N, H, D)
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]  # (B, M, H, D) each
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return self.project(out), attention


class TransformerLayer(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, mlp_ratio=4.0, bias=False, act=nnf.relu):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        x = x + self.mlp(self.norm2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, dim_self, num_heads, num_layers, dim_ref=None, mlp_ratio=2.0):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        self.layers = nn.ModuleList(
            [TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio) for _ in range(num_layers)]
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8, num_heads=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, num_heads, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)  # (B, L, C)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)  # (B, K, C)
        prefix = torch.cat((x, prefix), dim=1)  # (B, L+K, C)
        return self.transformer(prefix)[:, self.clip_length :]  # (B, K, C)


class ClipCaptionModel(nn.Module):
    """The official model, with ``gpt`` built from a config instead of downloaded.

    mapping_type: 'mlp' (COCO / Conceptual), 'linear' (legacy single Linear) or 'transformer'.
    """

    def __init__(self, prefix_length, clip_length=None, prefix_size=512, num_layers=8, mapping_type="mlp",
                 gpt_config=None, num_heads=8, gpt=None):
        super().__init__()
        self.prefix_length = prefix_length
        # `gpt`: share an existing GPT2LMHeadModel (tests build the 124M one once for several mappers)
        self.gpt = gpt if gpt is not None else GPT2LMHeadModel(gpt_config or GPT2Config())
        self.gpt_embedding_size = self.gpt.transformer.wte.weight.shape[1]
        c = self.gpt_embedding_size
        if mapping_type == "mlp":
            self.clip_project = MLP((prefix_size, (c * prefix_length) // 2, c * prefix_length))
        elif mapping_type == "linear":
            self.clip_project = nn.Linear(prefix_size, c * prefix_length)
        elif mapping_type == "transformer":
            self.clip_project = TransformerMapper(prefix_size, c, prefix_length, clip_length, num_layers,
                                                  num_heads=num_heads)
        else:
            raise ValueError(mapping_type)

    def project(self, prefix):
        """CLIP embedding (B, D) -> prefix embeddings (B, K, C), as the official code reshapes it."""
        return self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)

    def forward(self, tokens, prefix, mask=None):
        """Logits (B, K+T, V); ``mask`` (B, K+T): the attention mask over prefix + tokens (training)."""
        embedding_text = self.gpt.transformer.wte(tokens)  # (B, T, C)
        embedding_cat = torch.cat((self.project(prefix), embedding_text), dim=1)  # (B, K+T, C)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask).logits  # (B, K+T, V)


class ClipCaptionPrefix(ClipCaptionModel):
    """The official ``--only_prefix`` model: only the mapper's parameters are exposed (so the optimizer and
    ``zero_grad`` see only them), and ``train()`` keeps GPT-2 in eval mode (no dropout)."""

    def parameters(self, recurse=True):
        return self.clip_project.parameters()

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()
        return self


def official_pad_tokens(token_lists, max_seq_len, prefix_length):
    """The official ``ClipCocoDataset.pad_tokens`` for every caption: (N, T) int64 tokens padded with 0
    (longer ones cut), (N, K+T) float mask (1 over the prefix and the real tokens)."""
    rows, masks = [], []
    for ids in token_lists:
        tokens = torch.tensor(ids, dtype=torch.int64)
        padding = max_seq_len - tokens.shape[0]
        if padding > 0:
            tokens = torch.cat((tokens, torch.zeros(padding, dtype=torch.int64) - 1))
        elif padding < 0:
            tokens = tokens[:max_seq_len]
        mask = tokens.ge(0)
        tokens[~mask] = 0
        rows.append(tokens)
        masks.append(torch.cat((torch.ones(prefix_length), mask.float()), dim=0))
    return torch.stack(rows), torch.stack(masks)


def official_max_seq_len(token_lists):
    """``min(int(mean + 10 * std), max)`` of the caption lengths, as ``ClipCocoDataset.__init__``."""
    all_len = torch.tensor([len(t) for t in token_lists]).float()
    return min(int(all_len.mean() + all_len.std() * 10), int(all_len.max()))


class TransformersAdamW(torch.optim.Optimizer):
    """``transformers.AdamW`` (transformers 4.x; removed in 5), which the official ``train.py`` uses.

    Defaults eps 1e-6, weight decay 0.0, bias correction on; eps is added to the uncorrected sqrt(v), the
    corrections go into the step size, and the decoupled weight decay is applied after the Adam update.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def official_train_steps(model, batches, lr, warmup_steps, total_steps, prefix_length, dtype=torch.float32):
    """Run the official ``train()`` loop body over ``batches`` [(tokens, mask, prefix)], in order.

    ``model.train()``, ``TransformersAdamW(model.parameters(), lr=lr)``, ``get_linear_schedule_with_warmup``;
    per batch: ``model.zero_grad()``, logits ``[:, K-1:-1]``, ``cross_entropy(..., ignore_index=0)``,
    ``backward``, ``optimizer.step()``, ``scheduler.step()``, ``optimizer.zero_grad()``. Returns the losses.
    ``dtype``: the prefixes' dtype (the official code casts them to float32; float64 with a ``.double()``
    model gives a reference in (nearly) exact arithmetic).
    """
    from transformers import get_linear_schedule_with_warmup

    model.train()
    optimizer = TransformersAdamW(model.parameters(), lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                num_training_steps=total_steps)
    losses = []
    for tokens, mask, prefix in batches:
        model.zero_grad()
        logits = model(tokens, prefix.to(dtype), mask.to(dtype))[:, prefix_length - 1 : -1]
        loss = nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def normalize_embedding(embedding):
    """The released transformer weights expect an L2-normalised CLIP embedding."""
    return embedding / embedding.norm(2, dim=-1, keepdim=True)


# -------------------------------------------------------------------------------------------------- decoders


@torch.no_grad()
def generate2(model, tokenizer, embed, entry_length=67, top_p=0.8, temperature=1.0, stop_token=".",
              return_tokens=False):
    """The official greedy decoder for ONE prefix ``embed`` (1, K, C) (top-p filter, then argmax).

    Returns the decoded text (stop token kept), or (text, token ids, min top1-top2 logit gap) with
    ``return_tokens`` (the gap tells whether the comparison is meaningful: no near ties).
    """
    model.eval()
    stop_token_index = tokenizer.encode(stop_token)[0]
    filter_value = -float("Inf")
    tokens = None
    generated = embed
    min_gap = float("inf")
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        top2 = logits.topk(2, -1).values[0]
        min_gap = min(min_gap, float(top2[0] - top2[1]))
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        indices_to_remove = sorted_indices[sorted_indices_to_remove]
        logits[:, indices_to_remove] = filter_value
        next_token = torch.argmax(logits, -1).unsqueeze(0)
        next_token_embed = model.gpt.transformer.wte(next_token)
        tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        if stop_token_index == next_token.item():
            break
    output_list = tokens.reshape(-1).cpu().numpy().tolist()
    text = tokenizer.decode(output_list)
    if return_tokens:
        return text, output_list, min_gap
    return text


@torch.no_grad()
def generate_beam(model, tokenizer, beam_size=5, embed=None, entry_length=67, temperature=1.0, stop_token=".",
                  return_details=False):
    """The official beam search for ONE prefix ``embed`` (1, K, C); texts best first.

    With ``return_details``: (texts, token lists (best first, cut at their length), average scores (best
    first), min gap) where the gap is the smallest margin, over all steps, between the last kept and the first
    dropped candidate, and between the final best and second-best averages: a comparison against another
    implementation is only meaningful when it is well above numerical noise.
    """
    model.eval()
    stop_token_index = tokenizer.encode(stop_token)[0]
    tokens = None
    scores = None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = embed
    min_gap = float("inf")
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            top = logits.topk(beam_size + 1, -1).values[0]
            min_gap = min(min_gap, float(top[-2] - top[-1]))
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float(np.inf)
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            top = scores_sum_average.view(-1).topk(beam_size + 1, -1).values
            if torch.isfinite(top[-1]):
                min_gap = min(min_gap, float(top[-2] - top[-1]))
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = next_tokens % scores_sum.shape[1]
            next_tokens = next_tokens.unsqueeze(1)
            tokens = tokens[next_tokens_source]
            tokens = torch.cat((tokens, next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        is_stopped = is_stopped + next_tokens.eq(stop_token_index).squeeze()
        if is_stopped.all():
            break
    scores = scores / seq_lengths
    output_list = tokens.cpu().numpy()
    output_texts = [tokenizer.decode(output[: int(length)]) for output, length in zip(output_list, seq_lengths)]
    order = scores.argsort(descending=True)
    output_texts = [output_texts[i] for i in order]
    if not return_details:
        return output_texts
    token_lists = [output_list[i][: int(seq_lengths[i])].tolist() for i in order]
    sorted_scores = scores[order]
    if beam_size > 1:
        min_gap = min(min_gap, float(sorted_scores[0] - sorted_scores[1]))
    return output_texts, token_lists, sorted_scores.tolist(), min_gap


# ---------------------------------------------------------------------------------------- random checkpoints

#: Sizes of the released checkpoints and tiny counterparts. K = prefix_length, L = clip_length.
SIZES = {
    "real": {
        "gpt": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
        "mlp": dict(prefix_length=10, prefix_size=512),
        "linear": dict(prefix_length=40, prefix_size=512),
        "transformer": dict(prefix_length=40, clip_length=40, prefix_size=640, num_layers=8),
    },
    "tiny": {
        "gpt": dict(vocab_size=400, n_positions=96, n_embd=128, n_layer=2, n_head=2),  # n_head = n_embd // 64
        "mlp": dict(prefix_length=4, prefix_size=24),
        "linear": dict(prefix_length=12, prefix_size=24),
        "transformer": dict(prefix_length=5, clip_length=3, prefix_size=24, num_layers=2),
    },
}


def build_random_clipcap(kind="mlp", size="tiny", seed=0, init_scale=1.0, vocab_size=None, stop_token_id=None,
                         stop_boost=1.0, num_heads=8, gpt=None, dropout=None, cls=None):
    """A ClipCaptionModel with random weights, in eval mode.

    kind: 'mlp' | 'linear' | 'transformer'; size: 'real' | 'tiny'.
    init_scale multiplies GPT-2's initializer range (0.02) so next-token distributions are far from ties.
    stop_boost multiplies the stop token's embedding row so that captions sometimes end early.
    num_heads: the transformer mapper's head count (8 in the official code; must divide n_embd).
    gpt: reuse this GPT2LMHeadModel (already initialised) instead of building one; stop_boost is then
    not applied again.
    dropout: GPT-2's three dropout rates (None: GPT2Config's 0.1); cls: ClipCaptionPrefix for --only_prefix.
    """
    torch.manual_seed(seed)
    gpt_kw = dict(SIZES[size]["gpt"])
    if vocab_size is not None:
        gpt_kw["vocab_size"] = vocab_size
    v = gpt_kw["vocab_size"]
    if dropout is not None:
        gpt_kw.update(embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    config = GPT2Config(**gpt_kw, initializer_range=0.02 * init_scale, bos_token_id=v - 1, eos_token_id=v - 1)
    model = (cls or ClipCaptionModel)(mapping_type=kind, gpt_config=config, num_heads=num_heads, gpt=gpt,
                             **SIZES[size][kind])
    with torch.no_grad():
        # Give LayerNorms non-trivial affine parameters so a swapped gamma/beta cannot pass unnoticed.
        modules = model.clip_project.modules() if gpt is not None else model.modules()
        for module in modules:
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
        if gpt is None and stop_token_id is not None and stop_boost != 1.0:
            model.gpt.transformer.wte.weight[stop_token_id] *= stop_boost
    return model.eval()


def official_state_dict(model, legacy_buffers=False):
    """The state dict the official training script saves; legacy adds transformers-4.11 attention buffers."""
    sd = dict(model.state_dict())
    if legacy_buffers:
        n_pos = model.gpt.config.n_positions
        for i in range(model.gpt.config.n_layer):
            sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(
                torch.ones((n_pos, n_pos), dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
            sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def save_official(model, path, legacy_buffers=False):
    """``torch.save(model.state_dict(), path)`` as the official training script does; returns path."""
    torch.save(official_state_dict(model, legacy_buffers), str(path))
    return path
