"""Stage 1 of a LLaVA-style build: pretrain the toy vision tower CLIP-style, and measure its CLS.

LLaVA-1.5 drops CLIP's CLS token, so a tower trained inside LLaVA gives CLS no purpose. In CLIP,
CLS after the post-layernorm and a projection *is* the image embedding, trained against the
caption's embedding: that is where the CLS attention that FiCoCo-V, EViT, TopK-CLS, VisionZip and
PruMerge read gets its meaning. Here:

- `pretrain`: a `CLIPModel` (the toy tower + a small text encoder over captions, both from
  ficoco/toy/model.py) trained with CLIP's symmetric contrastive loss on the toy world's train
  split; a caption lists the scene's objects in raster order (`shapes.caption`). Two scenes can
  share a caption, so the loss's target spreads over every in-batch caption equal to the true one
  (with hard targets an identical caption would be pushed away as a negative).
- `retrieval_accuracy`: image -> caption top-1 among a set of held-out scenes.
- `cls_object_share`: the share of the feature layer's CLS attention (head mean, over patches)
  that lands on object patches, against their share of all patches: the quantity the CLS-reading
  methods rely on.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ficoco.paradigm.attention import head_mean_probs
from ficoco.toy import model as toy_model
from ficoco.toy import shapes


@dataclass(frozen=True)
class ClipSettings:
    seed: int = 0
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


def caption_batch(rows: list[shapes.ToySample], tokenizer) -> dict:
    """input_ids / attention_mask (B, T) of the rows' captions, right-padded."""
    encoded = tokenizer([row.caption() for row in rows], padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def contrastive_loss(logits_per_image: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy; the target of a row is uniform over the captions equal to its own.

    logits_per_image: (B, B), image i against caption j.
    """
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits_per_image.dtype)   # (B, B)
    targets = same / same.sum(dim=1, keepdim=True)          # symmetric relation: the same targets both ways
    image_to_text = -(targets * torch.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * torch.log_softmax(logits_per_image.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def learning_rate(step: int, settings: ClipSettings) -> float:
    warmup = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    return settings.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))


def pretrain(clip_model, processor, settings: ClipSettings, progress: bool = True) -> dict:
    """Train `clip_model` (a `CLIPModel`) in place; returns {"losses", "seconds", "settings"}."""
    from tqdm.auto import tqdm

    if settings.steps < 1 or settings.batch_size < 2:
        raise ValueError(f"CLIP pretraining needs steps >= 1 and batch_size >= 2; got {settings.steps}, "
                         f"{settings.batch_size}")
    torch.manual_seed(settings.seed)
    clip_model.train()
    optimizer = torch.optim.AdamW(clip_model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.98))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="pretrain toy CLIP", disable=not progress, mininterval=2.0)
    for step in bar:
        first = step * settings.batch_size
        rows = [shapes.sample(settings.seed, "train", first + i) for i in range(settings.batch_size)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        output = clip_model(**caption_batch(rows, processor.tokenizer),
                            pixel_values=toy_model.pixel_values(shapes.batch_pixels(rows), processor))
        loss = contrastive_loss(output.logits_per_image, [row.caption() for row in rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    clip_model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "settings": settings.to_dict()}


@torch.no_grad()
def retrieval_accuracy(clip_model, processor, rows: list[shapes.ToySample]) -> float:
    """Fraction of images whose highest-scoring caption among the rows' captions reads as their own."""
    output = clip_model(**caption_batch(rows, processor.tokenizer),
                        pixel_values=toy_model.pixel_values(shapes.batch_pixels(rows), processor))
    best = output.logits_per_image.argmax(dim=1).tolist()                  # (B,) caption index per image
    return float(np.mean([rows[j].caption() == row.caption() for row, j in zip(rows, best)]))


@torch.no_grad()
def cls_attention(tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """(B, N) the CLS row of the feature layer's attention over the patches, head mean, renormalised.

    tower: a CLIP vision transformer (`CLIPVisionModel` or `CLIPModel.vision_model`);
    feature_layer: LLaVA's `vision_feature_layer` (-2 = the second to last layer), i.e. the layer
    whose output LLaVA reads. Its attention is recomputed from its input, as the methods read it.
    """
    layers = tower.encoder.layers
    # hidden_states[0] is the embeddings, hidden_states[i + 1] layer i's output (`ModelDims.last_vision_layer`)
    index = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - 1
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[index]   # (B, 1+N, D) its input
    layer = layers[index]
    normed = layer.layer_norm1(hidden)
    attention = layer.self_attn
    batch = normed.shape[0]

    def heads(x: torch.Tensor) -> torch.Tensor:                           # (B, T, D) -> (B, H, T, d)
        return x.view(batch, x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    row = head_mean_probs(heads(attention.q_proj(normed[:, :1])), heads(attention.k_proj(normed)),
                          attention.scale)[:, 0, 1:]                       # (B, N) CLS -> patches
    return row / row.sum(dim=1, keepdim=True)


def cls_object_share(tower, processor, rows: list[shapes.ToySample], feature_layer: int = -2) -> dict:
    """Mean share of the CLS attention on each scene's object patches, and those patches' share of all patches."""
    row = cls_attention(tower, toy_model.pixel_values(shapes.batch_pixels(rows), processor), feature_layer)   # (B, N)
    n_patches = row.shape[1]
    on_objects = [float(row[i, [o.patch_index for o in r.objects]].sum()) for i, r in enumerate(rows)]
    patch_share = [len(r.objects) / n_patches for r in rows]
    return {"cls_share_on_objects": float(np.mean(on_objects)), "object_patch_share": float(np.mean(patch_share)),
            "ratio": float(np.mean(on_objects) / np.mean(patch_share)), "rows": len(rows)}
