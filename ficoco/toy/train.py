"""Train the toy LLaVA on the toy world's train split, and measure it the way an evaluate job would.

Training: next-token loss on the answer word and `</s>` only (the prompt and the image placeholders
are masked out), AdamW with linear warm-up and cosine decay, a fresh stream of generated samples
(index = step * batch_size + row, split "train"), deterministic for a seed and thread count.

Measurement (`generation_accuracy`): the processor builds `PROMPT_TEMPLATE` with the question,
`<image>` expands to 144 placeholders, `model.generate` decodes greedily, and the answer is scored
by exact match after lower/strip. `keep_visual` drops image placeholders at random (the "random"
baseline) by passing `inputs_embeds` with only the kept image rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

from ficoco.toy import model as toy_model
from ficoco.toy import shapes

TURN_TEMPLATE = "USER: {prompt} ASSISTANT:"      # a later turn of a training conversation


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    size: str = "default"
    turns: int = 4                  # questions per image in one training conversation
    curriculum: float = 0.3         # fraction of steps over which distractors grow from 0 to 3
    aux_weight: float = 0.0         # weight of a per-patch colour/shape probe loss (probe discarded)

    def to_dict(self) -> dict:
        return asdict(self)


def pixel_values(images: list, processor) -> torch.Tensor:
    """(B, 3, H, W) float32, exactly the CLIP processor's rescale + normalise (no resize: size matches)."""
    ip = processor.image_processor
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])     # (B, H, W, 3)
    array = (array * np.float32(ip.rescale_factor) - np.asarray(ip.image_mean, np.float32)) \
        / np.asarray(ip.image_std, np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def training_batch(rows: list[shapes.ToySample], processor, turns: int = 1,
                   rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/labels/attention_mask (B, T), pixel_values (B, 3, H, W).

    One conversation per image, in the evaluate job's format for its first turn:
    processor(PROMPT_TEMPLATE with the row's question) + answer + </s>, then up to `turns - 1`
    more questions about the same image (drawn by `rng` from `row.all_questions()`), each as
    "USER: {question} ASSISTANT:" + answer + </s>. Labels are -100 except on answers and </s>.
    """
    tokenizer = processor.tokenizer
    sequences, label_rows = [], []
    for row in rows:
        conversation = [(row.question, row.answer)]
        if turns > 1:
            others = [(q, a) for _, q, a in row.all_questions() if q != row.question]
            if rng is None:
                raise ValueError("turns > 1 needs an rng to draw the extra questions")
            picked = rng.permutation(len(others))[:turns - 1]
            conversation += [others[int(i)] for i in picked]
        ids = _prompt_ids(row.question, processor)
        labels = [-100] * len(ids)
        for turn, (question, answer) in enumerate(conversation):
            if turn > 0:
                turn_ids = tokenizer(TURN_TEMPLATE.format(prompt=question), add_special_tokens=False)["input_ids"]
                ids, labels = ids + turn_ids, labels + [-100] * len(turn_ids)
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = ids + answer_ids, labels + answer_ids
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
            "pixel_values": pixel_values([row.image() for row in rows], processor)}


def _prompt_ids(question: str, processor) -> list[int]:
    """Token ids of the full prompt with `<image>` expanded, as the processor makes them."""
    n_image = shapes.GRID * shapes.GRID
    text = toy_model.prompt_text(question).replace("<image>", "<image>" * n_image)
    return processor.tokenizer(text)["input_ids"]


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


def probe_targets(rows: list[shapes.ToySample]) -> torch.Tensor:
    """(B, N, 2) per-patch class ids: colour (0 = none), shape (0 = none)."""
    n_patches = shapes.GRID * shapes.GRID
    targets = torch.zeros(len(rows), n_patches, 2, dtype=torch.long)
    for i, row in enumerate(rows):
        for obj in row.objects:
            targets[i, obj.patch_index, 0] = 1 + shapes.COLOR_NAMES.index(obj.color)
            targets[i, obj.patch_index, 1] = 1 + shapes.SHAPE_NAMES.index(obj.shape)
    return targets


PROBE_CLASSES = (len(shapes.COLOR_NAMES) + 1, len(shapes.SHAPE_NAMES) + 1)


def probe_loss(probe, hidden, batch, rows, image_token_id: int) -> torch.Tensor:
    """Summed cross-entropy of a linear probe reading each image position's colour and shape."""
    n_patches = shapes.GRID * shapes.GRID
    image = batch["input_ids"] == image_token_id                              # (B, T)
    logits = probe(hidden[image].view(len(rows), n_patches, -1))              # (B, N, sum(PROBE_CLASSES))
    targets = probe_targets(rows)                                             # (B, N, 3)
    loss, start = 0.0, 0
    for j, n_classes in enumerate(PROBE_CLASSES):
        part = logits[..., start:start + n_classes].reshape(-1, n_classes)
        loss = loss + torch.nn.functional.cross_entropy(part, targets[..., j].reshape(-1))
        start += n_classes
    return loss


def train(model, processor, settings: TrainSettings, progress: bool = True) -> dict:
    """Train `model` in place; returns {"losses": [...], "seconds": float, "settings": {...}}."""
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    model.train()
    probe = None
    named = list(model.named_parameters())
    if settings.aux_weight > 0:
        probe = torch.nn.Linear(model.config.text_config.hidden_size, sum(PROBE_CLASSES))
        named += [("probe." + n, p) for n, p in probe.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train toy llava", disable=not progress, mininterval=2.0)
    for step in bar:
        first = step * settings.batch_size
        max_others = distractor_cap(step, settings)
        rows = [shapes.sample(settings.seed, "train", first + i, max_others=max_others)
                for i in range(settings.batch_size)]
        batch = training_batch(rows, processor, settings.turns, np.random.default_rng([settings.seed, step]))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        if probe is None:
            loss = model(**batch).loss
        else:
            output = model(**batch, output_hidden_states=True)
            loss = output.loss + settings.aux_weight * probe_loss(probe, output.hidden_states[-1], batch, rows,
                                                                   model.config.image_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "settings": settings.to_dict()}


@torch.no_grad()
def generate_answers(model, processor, rows, keep_visual: int | None = None, seed: int = 0,
                     max_new_tokens: int = 4) -> list[str]:
    """Greedy answers, one sample at a time, as an evaluate job would produce them.

    keep_visual: None = all 144 image placeholders; k = keep k of them chosen uniformly at random
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
            output = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[0]                                  # inputs_embeds: only new tokens
        answers.append(processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def _embeds_keeping_random_visual(model, inputs, keep: int, generator: torch.Generator) -> torch.Tensor:
    """LLM input embeddings with only `keep` randomly chosen image rows (original order kept)."""
    input_ids = inputs["input_ids"]                                  # (1, T)
    text_embeds = model.get_input_embeddings()(input_ids)            # (1, T, D)
    features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    image_features = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features[0]
    image_positions = (input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)   # (N,)
    n_visual = image_positions.numel()
    if not 1 <= keep <= n_visual:
        raise ValueError(f"keep_visual={keep}: must be in 1..{n_visual}")
    kept = torch.randperm(n_visual, generator=generator)[:keep].sort().values             # (keep,)
    embeds = text_embeds[0].clone()
    embeds[image_positions] = image_features.reshape(n_visual, -1).to(embeds.dtype)
    keep_mask = torch.ones(embeds.shape[0], dtype=torch.bool)
    keep_mask[image_positions] = False
    keep_mask[image_positions[kept]] = True
    return embeds[keep_mask].unsqueeze(0)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    return float(np.mean([p.strip().lower() == a.strip().lower() for p, a in zip(predictions, answers)]))
