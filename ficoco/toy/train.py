"""Train the toy LLaVA on the toy world's train split, and measure it the way an evaluate job would.

Two recipes (`TrainSettings.for_recipe`):
- "end-to-end" (the default model today): tower, projector and LLM trained together by `train`;
- "staged", as LLaVA-1.5 is built: (1) the tower pretrained CLIP-style (ficoco/toy/clip.py),
  (2) the projector aligned with tower and LLM frozen (`align_projector`), (3) projector and LLM
  instruction-tuned by `train` with the tower frozen.

Training (`train`):
- data: a fresh stream of generated samples (index = step * batch_size + row, split "train");
  each image becomes one conversation of `turns` questions about it, whose first turn is exactly
  the evaluate job's prompt (processor + PROMPT_TEMPLATE), later turns "USER: {q} ASSISTANT:";
- loss: next-token cross-entropy on the answer words and their `</s>` (everything else masked),
  plus two training-only grounding aids that make a from-scratch tiny model learn in minutes:
  * probe loss: a linear probe (discarded afterwards) reads every image position's colour,
    shape and side (or "none") from the input of the grounding layer;
  * attention losses: at every answer position, head 0 (heads 0..`attention_heads`-1) of LLM
    layer `copy_layer` is trained to attend to the asked-about word (the last before "?"), and
    those of LLM layer `grounding_layer` to put their attention on the image positions of the
    object(s) the question is about: the two hops of "find the object named in the question,
    read it".
  Without them the answer signal of one object patch is diluted over 144 image tokens and the
  loss sits at the answer prior for thousands of steps (see docs/toy.md);
- AdamW, linear warm-up, cosine decay, gradient clipping 1.0; a curriculum grows the distractors
  per image from 0 to 3 over the first `curriculum` fraction of the steps;
- deterministic for a seed and a thread count (torch.manual_seed, no data-loader workers).

Measurement (`generate_answers`): the processor builds PROMPT_TEMPLATE with the question, `<image>`
expands to 144 placeholders, `model.generate` decodes greedily. `keep_visual=k` keeps k image rows
chosen at random (the "random" baseline) by passing `inputs_embeds` without the dropped rows.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

from ficoco.toy import model as toy_model
from ficoco.toy import shapes
from ficoco.toy.clip import ClipSettings

TURN_TEMPLATE = "USER: {prompt} ASSISTANT:"      # a later turn of a training conversation
GROUNDED_KINDS = ("color", "shape", "position")  # one target object: its attention is supervised
# (not count: pulling all attention onto the counted objects would erase how many there are)


@dataclass(frozen=True)
class TrainSettings:
    recipe: str = "end-to-end"      # or "staged": LLaVA-1.5's stages on a CLIP-style tower (for_recipe)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    size: str = "default"
    turns: int = 4                  # questions per image in one training conversation
    curriculum: float = 0.3         # fraction of steps over which distractors grow from 0 to 3
    probe_weight: float = 1.0       # per-patch colour/shape probe loss (0 = off)
    attention_weight: float = 1.0   # answer-position attention losses (0 = off)
    copy_layer: int = 1             # LLM layer whose head 0 is taught to read the asked-about word
    grounding_layer: int | None = None   # LLM layer whose heads are taught to find the target; None = layers // 2
    attention_heads: int | None = 1  # heads 0..n-1 of each supervised layer the attention aids train; None = all
    clip: ClipSettings | None = None     # staged: stage 1, the tower's contrastive pretraining
    align_steps: int = 0            # staged: stage 2, projector-only alignment steps (tower and LLM frozen)
    projector_lr_scale: float = 1.0  # the projector's learning rate relative to `lr` in instruction tuning

    @classmethod
    def for_recipe(cls, recipe: str, **overrides) -> "TrainSettings":
        """The settings of a recipe, with `overrides` (e.g. steps) on top of its defaults.

        staged: the tower frozen after its CLIP-style pretraining trains the LLM far more slowly, so
        the attention aids supervise every head of their layers, steps take 32 images, and the
        projector learns 10 times faster than the LLM (it must turn the frozen tower's features into
        tokens the LLM can read before the LLM can learn to answer); 800 steps (500 reached 94.5% held-out on the
        CPU kernels of 2026-12-03 and 86.5% on those of 2026-12-05; 800: 97.5%) (docs/toy.md, "The staged recipe",
        for the measurements behind these defaults).
        """
        if recipe not in toy_model.RECIPES:
            raise ValueError(f"recipe={recipe!r}: valid recipes are {list(toy_model.RECIPES)}")
        defaults = {"staged": dict(steps=800, batch_size=32, attention_heads=None, align_steps=100,
                                   projector_lr_scale=10.0,
                                   clip=ClipSettings(seed=overrides.get("seed", 0)))}.get(recipe, {})
        return cls(recipe=recipe, **{**defaults, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def token_ids(tokenizer):
    """(text, special_tokens) -> the text's token ids as a tuple, each distinct text tokenised once.

    A training run asks for the same few dozen prompts, turns and answers thousands of times; the
    tokenizer took about 6 % of a step.
    """
    @functools.lru_cache(maxsize=None)
    def ids(text: str, special_tokens: bool) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    return ids


def training_batch(rows: list[shapes.ToySample], processor, turns: int = 1,
                   rng: np.random.Generator | None = None, tokens=None) -> dict:
    """Right-padded batch for one training step; `tokens` is a `token_ids` cache (None: a new one).

    Returns input_ids / labels / attention_mask (B, T) and pixel_values (B, 3, H, W) for the model,
    "grounding": a list of (batch row, answer-predicting position, [image positions of the target
    objects]), and "asked": a list of (batch row, answer-predicting position, [position of the
    asked-about word, the last one before "?"]), one entry per question.
    """
    tokenizer = processor.tokenizer
    tokens = token_ids(tokenizer) if tokens is None else tokens
    n_patches = shapes.GRID * shapes.GRID
    question_mark = tokenizer.convert_tokens_to_ids("?")
    sequences, label_rows, grounding, asked = [], [], [], []
    for b, row in enumerate(rows):
        conversation = [(row.kind, row.question, row.answer, row.target)]
        if turns > 1:
            if rng is None:
                raise ValueError("turns > 1 needs an rng to draw the extra questions")
            others = [q for q in row.all_questions() if q[1] != row.question]
            conversation += [others[int(i)] for i in rng.permutation(len(others))[:turns - 1]]
        # the full first-turn prompt with `<image>` expanded, as the processor makes it
        ids = list(tokens(toy_model.prompt_text(row.question).replace("<image>", "<image>" * n_patches), True))
        image_start = ids.index(toy_model.image_token_id())
        labels = [-100] * len(ids)
        for turn, (kind, question, answer, target) in enumerate(conversation):
            if turn > 0:
                turn_ids = list(tokens(TURN_TEMPLATE.format(prompt=question), False))
                ids, labels = ids + turn_ids, labels + [-100] * len(turn_ids)
            answer_position = len(ids) - 1
            asked.append((b, answer_position, [answer_position - ids[::-1].index(question_mark) - 1]))
            if kind in GROUNDED_KINDS:
                patches = [image_start + row.objects[i].patch_index for i in target]
                grounding.append((b, answer_position, patches))
            answer_ids = [*tokens(answer, False), tokenizer.eos_token_id]
            ids, labels = ids + answer_ids, labels + answer_ids
        assert ids[image_start:image_start + n_patches] == [toy_model.image_token_id()] * n_patches
        sequences.append(ids)
        label_rows.append(labels)
    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(sequences, label_rows)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": toy_model.pixel_values(shapes.batch_pixels(rows), processor), "grounding": grounding,
            "asked": asked}


def learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distractor_cap(step: int, settings: TrainSettings) -> int:
    """Most distractors per image at `step`: 0 at the start, 3 from `curriculum * steps` on."""
    ramp = settings.curriculum * settings.steps
    if ramp <= 0:
        return 3
    return min(3, int(4 * step / ramp))


# colour / shape / side of the object in a patch, class 0 = no object there
PROBE_CLASSES = (len(shapes.COLOR_NAMES) + 1, len(shapes.SHAPE_NAMES) + 1, len(shapes.SIDES) + 1)


def probe_targets(rows: list[shapes.ToySample]) -> torch.Tensor:
    """(B, N, 3) per-patch class ids: colour, shape, side (0 = no object in the patch)."""
    n_patches = shapes.GRID * shapes.GRID
    targets = torch.zeros(len(rows), n_patches, len(PROBE_CLASSES), dtype=torch.long)
    for i, row in enumerate(rows):
        for obj in row.objects:
            targets[i, obj.patch_index, 0] = 1 + shapes.COLOR_NAMES.index(obj.color)
            targets[i, obj.patch_index, 1] = 1 + shapes.SHAPE_NAMES.index(obj.shape)
            targets[i, obj.patch_index, 2] = 1 + shapes.SIDES.index(shapes.side(obj))
    return targets


def probe_loss(probe, hidden, input_ids, rows, image_token_id: int) -> torch.Tensor:
    """Summed cross-entropy of a linear probe reading each image position's colour and shape."""
    n_patches = shapes.GRID * shapes.GRID
    image = input_ids == image_token_id                                        # (B, T)
    logits = probe(hidden[image].view(len(rows), n_patches, -1))               # (B, N, sum(PROBE_CLASSES))
    targets = probe_targets(rows)                                              # (B, N, 3)
    loss, start = 0.0, 0
    for j, n_classes in enumerate(PROBE_CLASSES):
        part = logits[..., start:start + n_classes].reshape(-1, n_classes)
        loss = loss + torch.nn.functional.cross_entropy(part, targets[..., j].reshape(-1))
        start += n_classes
    return loss


def attention_loss(layer, captured: dict, grounding: list, heads: int | None = 1) -> torch.Tensor:
    """-log(attention mass on the target positions) of heads 0..heads-1 (None = all), averaged over
    those heads and the answer positions.

    `captured` holds the layer's input hidden states (B, T, D) and RoPE (cos, sin) from a pre-hook.
    The probabilities are computed for the answer rows only, with the causal mask, as the layer's
    own attention computes them (padding sits after every answer, so it is never a key here).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = layer.self_attn
    x = layer.input_layernorm(captured["hidden"])                               # (B, T, D)
    batch, length, _ = x.shape
    head_dim = attention.head_dim
    q = attention.q_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)   # (B, H, T, d)
    k = attention.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)   # (B, Hkv, T, d)
    cos, sin = captured["position_embeddings"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)                    # (B, H, T, d): each query head's keys
    heads = q.shape[1] if heads is None else heads
    if not 1 <= heads <= q.shape[1]:
        raise ValueError(f"attention_heads={heads}: the layer has {q.shape[1]} heads; valid: 1..{q.shape[1]} or None")
    # all answer rows at once (one entry e per answer position): a loop over them cost a third of a step
    rows = torch.tensor([b for b, _, _ in grounding])                            # (E,)
    queries = torch.tensor([query for _, query, _ in grounding])                 # (E,)
    on_target = torch.zeros(len(grounding), length, dtype=torch.bool)           # (E, T)
    for entry, (_, _, keys) in enumerate(grounding):
        on_target[entry, keys] = True
    scores = (k[rows, :heads] @ q[rows, :heads, queries, :, None])[..., 0] * attention.scaling   # (E, heads, T)
    future = torch.arange(length)[None, :] > queries[:, None]                    # (E, T): the causal mask
    log_probs = torch.log_softmax(scores.float().masked_fill(future[:, None], float("-inf")), dim=-1)
    on_targets = torch.logsumexp(log_probs.masked_fill(~on_target[:, None], float("-inf")), dim=-1)   # (E, heads)
    return -on_targets.mean(dim=-1).mean()


def projector_targets(model, rows: list[shapes.ToySample], tokenizer) -> torch.Tensor:
    """(B, N, D) stage 2's target for each projected patch: the LLM's input embeddings of the words
    that describe it (colour + shape + side for an object's patch, the side for a floor patch)."""
    embeddings = model.get_input_embeddings().weight.detach()                  # (V, D)
    word = tokenizer.convert_tokens_to_ids
    n_patches = shapes.GRID * shapes.GRID
    floor = [word(shapes.column_side(p % shapes.GRID)) for p in range(n_patches)]
    targets = embeddings[floor].repeat(len(rows), 1, 1)                        # (B, N, D)
    for i, row in enumerate(rows):
        for obj in row.objects:
            targets[i, obj.patch_index] = embeddings[[word(obj.color), word(obj.shape), word(shapes.side(obj))]].sum(0)
    return targets


def align_projector(model, processor, settings: TrainSettings, progress: bool = True) -> dict:
    """Stage 2 of the staged recipe: train the projector alone (tower and LLM frozen); returns {"losses", "seconds"}.

    LLaVA aligns its projector by captioning through a pretrained, frozen LLM. The toy LLM has no
    pretraining, so the target is what that alignment achieves: each patch's projected token on the
    LLM's own input embeddings of the words describing it (squared error, `projector_targets`).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    projector = model.model.multi_modal_projector
    tower = model.model.vision_tower
    optimizer = torch.optim.AdamW(projector.parameters(), lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(settings.align_steps), desc="align toy projector", disable=not progress, mininterval=2.0):
        rows = [shapes.sample(settings.seed, "train", step * settings.batch_size + i)
                for i in range(settings.batch_size)]
        with torch.no_grad():
            hidden = tower(pixel_values=toy_model.pixel_values(shapes.batch_pixels(rows), processor),
                           output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        projected = projector(hidden[:, 1:])                                    # (B, N, D): LLaVA drops CLS
        loss = ((projected - projector_targets(model, rows, processor.tokenizer)) ** 2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "seconds": time.perf_counter() - start}


def train(model, processor, settings: TrainSettings, progress: bool = True) -> dict:
    """Train `model` in place; returns {"losses": [...], "answer_losses": [...], "seconds", "settings"}."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    model.train()
    if settings.recipe == "staged":          # LLaVA's stage 3: the pretrained tower stays as it is
        model.model.vision_tower.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    probe = None
    if settings.probe_weight > 0:
        probe = torch.nn.Linear(model.config.text_config.hidden_size, sum(PROBE_CLASSES))
        named += [("probe." + n, p) for n, p in probe.named_parameters()]
    if settings.projector_lr_scale < 0:
        raise ValueError(f"projector_lr_scale={settings.projector_lr_scale}: valid: a factor >= 0")
    # weight decay on matrices but embeddings; the projector's learning rate scaled (1 but in the staged
    # recipe) and its decay divided by the same factor, so its weights decay per step like every other matrix
    groups = []
    for in_projector in (False, True):
        chosen = [(n, p) for n, p in named if n.startswith("model.multi_modal_projector.") == in_projector]
        scale = settings.projector_lr_scale if in_projector else 1.0
        groups += [{"params": [p for n, p in chosen if p.ndim >= 2 and "embed" not in n],
                    "weight_decay": settings.weight_decay / scale if scale > 0 else 0.0, "lr_scale": scale},
                   {"params": [p for n, p in chosen if not (p.ndim >= 2 and "embed" not in n)],
                    "weight_decay": 0.0, "lr_scale": scale}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98))

    layers = model.model.language_model.layers
    grounding_layer = len(layers) // 2 if settings.grounding_layer is None else settings.grounding_layer
    for name, index in (("grounding_layer", grounding_layer), ("copy_layer", settings.copy_layer)):
        if not 0 <= index < len(layers):
            raise ValueError(f"{name}={index}: valid layers are 0..{len(layers) - 1}")
    # supervised layer -> (batch key of its (row, query, keys) list, what its pre-hook captured)
    supervised = {settings.copy_layer: ("asked", {}), grounding_layer: ("grounding", {})} \
        if settings.attention_weight > 0 else {}
    if len(supervised) == 1:
        raise ValueError(f"copy_layer and grounding_layer must differ; both are {grounding_layer}")

    def capture(store: dict):
        def hook(module, args, kwargs):
            store["hidden"] = args[0] if args else kwargs["hidden_states"]
            store["position_embeddings"] = kwargs["position_embeddings"]
        return hook

    hooks = [layers[index].register_forward_pre_hook(capture(store), with_kwargs=True)
             for index, (_, store) in supervised.items()]
    tokens = token_ids(processor.tokenizer)

    losses: list[float] = []
    parts: dict[str, list[float]] = {"answer": [], "probe": [], "asked": [], "grounding": []}   # per step
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train toy llava", disable=not progress, mininterval=2.0)
    try:
        for step in bar:
            first = step * settings.batch_size
            max_others = distractor_cap(step, settings)
            rows = [shapes.sample(settings.seed, "train", first + i, max_others=max_others)
                    for i in range(settings.batch_size)]
            batch = training_batch(rows, processor, settings.turns, np.random.default_rng([settings.seed, step]),
                                   tokens)
            targets = {key: batch.pop(key) for key in ("grounding", "asked")}
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings) * group["lr_scale"]
            output = model(**batch, output_hidden_states=probe is not None)
            terms = {"answer": output.loss}
            if probe is not None:     # read where the grounding layer reads: its input
                terms["probe"] = settings.probe_weight * probe_loss(
                    probe, output.hidden_states[grounding_layer], batch["input_ids"], rows,
                    model.config.image_token_id)
            for index, (key, store) in supervised.items():
                if targets[key]:
                    terms[key] = settings.attention_weight * attention_loss(layers[index], store, targets[key],
                                                                            settings.attention_heads)
                store.clear()
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            for key in parts:
                parts[key].append(float(terms[key].detach()) if key in terms else float("nan"))
            if step % 10 == 0:
                bar.set_postfix({key: f"{np.mean(values[-10:]):.3f}" for key, values in parts.items()})
    finally:
        for hook in hooks:
            hook.remove()
    model.eval()
    return {"losses": losses, "answer_losses": parts["answer"], "loss_parts": parts,
            "seconds": time.perf_counter() - start, "settings": settings.to_dict(),
            "grounding_layer": grounding_layer}


@torch.no_grad()
def generate_answers(model, processor, rows, keep_visual: int | None = None, seed: int = 0,
                     max_new_tokens: int = 4) -> list[str]:
    """Greedy answers, one sample at a time, as an evaluate job would produce them.

    rows: ToySample objects or benchmark rows (dicts with "image" and "question").
    keep_visual: None = all image placeholders; k = keep k of them chosen uniformly at random
    (per sample, from a generator seeded with `seed`), in their original order.
    """
    generator = torch.Generator().manual_seed(seed)
    answers = []
    for row in rows:
        image = row["image"] if isinstance(row, dict) else row.image()
        question = row["question"] if isinstance(row, dict) else row.question
        inputs = processor(images=image, text=toy_model.prompt_text(question), return_tensors="pt")
        if keep_visual is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
        else:
            embeds = _embeds_keeping_random_visual(model, inputs, keep_visual, generator)   # (1, T', D)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            output = model.generate(inputs_embeds=embeds, attention_mask=mask,
                                    max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[0]                                  # with inputs_embeds: only new tokens
        answers.append(processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def _embeds_keeping_random_visual(model, inputs, keep: int, generator: torch.Generator) -> torch.Tensor:
    """(1, T - N + keep, D) LLM input embeddings keeping `keep` random image rows in original order."""
    input_ids = inputs["input_ids"]                                             # (1, T)
    text_embeds = model.get_input_embeddings()(input_ids)                       # (1, T, D)
    features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    image_features = torch.cat(list(features), dim=0)                           # (N, D)
    image_positions = (input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)   # (N,)
    n_visual = image_positions.numel()
    if not 1 <= keep <= n_visual:
        raise ValueError(f"keep_visual={keep}: must be in 1..{n_visual}")
    kept = torch.randperm(n_visual, generator=generator)[:keep].sort().values  # (keep,)
    embeds = text_embeds[0].clone()
    embeds[image_positions] = image_features.reshape(n_visual, -1).to(embeds.dtype)
    keep_mask = torch.ones(embeds.shape[0], dtype=torch.bool)
    keep_mask[image_positions] = False
    keep_mask[image_positions[kept]] = True
    return embeds[keep_mask].unsqueeze(0)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of exact matches after lower/strip."""
    return float(np.mean([p.strip().lower() == a.strip().lower() for p, a in zip(predictions, answers)]))
