"""CLIP's text tower beside a LLaVA model: what an instruction-conditioned method reads (CDPruner).

LLaVA-1.5's vision tower is CLIP ViT-L/14-336's, frozen while LLaVA trained (the toy model's is its
own CLIP-style pretrained tower, frozen likewise). That CLIP checkpoint's text tower and projections
put the instruction and each visual token into one embedding space. `TextTower` holds what
`InstructionScores` (ficoco/contract.py) hands a method, all in float32 as in the authors' code:

- image embeddings: the feature layer's patch outputs through the checkpoint's post-layernorm and
  visual projection, (N, C) per image;
- text embeddings: the instruction, i.e. the text that stands for `{prompt}` in the model's prompt
  template, recovered from the prompt's token ids after the image (`instruction_text`; a prompt
  without the template's form is refused). CLIP's tokenizer encodes it; the ids are split into
  segments of the text tower's context length (the last one padded, masked out) and each segment's
  projected pooled output is one embedding, (M, C);
- their cosines, (N, M) per image.

`load_text_tower(directory, tokenizer, template, tower, feature_layer)` loads it from a CLIP
checkpoint directory (the toy model's `clip/`; a hub model's companion fetched into its `clip/` at a
pinned revision) and refuses a checkpoint whose vision weights are not the ones the LLaVA tower
runs: the text tower of another CLIP would score the tokens in a space they were never encoded in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

COMPANION_DIR = "clip"      # the companion CLIP checkpoint's folder inside a model directory
TEXT_ATTENTION = "eager"    # explicit products: 77 tokens gain nothing from a fused kernel, and every MAC is counted
LEGACY_END_TOKEN_ID = 2     # transformers' CLIP text tower pools at the largest id when eos_token_id is 2


@dataclass
class TextTower:
    """A CLIP checkpoint's text tower and projections, the LLM tokenizer and the prompt template."""

    text_model: torch.nn.Module             # CLIP's text transformer (its pooled output: the end token's state)
    text_projection: torch.nn.Module        # (D_text -> C) without bias
    post_layernorm: torch.nn.Module         # the checkpoint's vision post-layernorm
    visual_projection: torch.nn.Module      # (D_vision -> C) without bias
    clip_tokenizer: object
    llm_tokenizer: object
    template_head: list[int]                # LLM ids between the image and the instruction ("\n")
    template_tail: list[int]                # LLM ids after the instruction (" ASSISTANT:")
    template: str

    # -- the instruction --------------------------------------------------------------------------
    def instruction_text(self, ids: list[int]) -> str:
        """The instruction of a prompt from its LLM token ids after the image (padding excluded)."""
        head, tail = self.template_head, self.template_tail
        if ids[:len(head)] != head or len(ids) < len(head) + len(tail) or ids[len(ids) - len(tail):] != tail:
            seen = self.llm_tokenizer.decode(ids)
            raise ValueError(f"the prompt after the image ({seen!r}) does not have the form of the template "
                             f"{self.template!r}, so its instruction cannot be told apart for CLIP's text tower; "
                             f"build prompts with that template")
        return self.llm_tokenizer.decode(ids[len(head):len(ids) - len(tail)], skip_special_tokens=True).strip()

    # -- embeddings -----------------------------------------------------------------------------------
    @property
    def context(self) -> int:
        """Tokens per text-tower segment (CLIP: 77)."""
        return self.text_model.config.max_position_embeddings

    def text_ids(self, text: str) -> list[int]:
        """CLIP's token ids of `text`, ending with the token the text tower pools at.

        CLIP's tokenizer appends <|endoftext|>, which (the largest id) the legacy pooling takes; a
        tower that pools at a named end token (the toy's, at its captions' ".") gets that token
        appended when its tokenizer did not add it.
        """
        ids = list(self.clip_tokenizer(text)["input_ids"])
        end = self.text_model.config.eos_token_id
        if end != LEGACY_END_TOKEN_ID and end not in ids:
            ids.append(end)
        return ids

    def text_embeddings(self, text: str) -> torch.Tensor:
        """(M, C) float32: one projected embedding per `context`-token segment of the text."""
        ids = self.text_ids(text)
        segments = -(-len(ids) // self.context)
        padded = torch.zeros(segments * self.context, dtype=torch.int64)
        padded[:len(ids)] = torch.tensor(ids)
        mask = (torch.arange(segments * self.context) < len(ids)).long()
        device = self.visual_projection.weight.device
        output = self.text_model(input_ids=padded.view(segments, -1).to(device),
                                 attention_mask=mask.view(segments, -1).to(device))
        return self.text_projection(output.pooler_output).float()                      # (M, C)

    def image_embeddings(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, D_vision) feature-layer patch outputs -> (N, C) float32 CLIP image embeddings."""
        weight = self.visual_projection.weight
        return self.visual_projection(self.post_layernorm(patches.to(weight.device, torch.float32)))

    # -- cost -----------------------------------------------------------------------------------------
    def macs(self, tokens: int, segments: int) -> int:
        """Multiply-accumulates of `tokens` image embeddings, the text tower on `segments` padded
        segments (attention over the whole context, masked or not), and the (N, M) cosines."""
        text, width = self.text_model.config, self.visual_projection.weight.shape[0]
        vision_width = self.visual_projection.weight.shape[1]
        context, hidden = self.context, text.hidden_size
        per_layer = 4 * context * hidden * hidden + 2 * context * hidden * text.intermediate_size \
            + 2 * context * context * hidden                                   # q, k, v, o; MLP; QK^T and AV
        tower = segments * (text.num_hidden_layers * per_layer + hidden * width)   # + the pooled row's projection
        return tokens * vision_width * width + tower + tokens * segments * width


def template_edges(tokenizer, template: str, image_token: str) -> tuple[list[int], list[int]]:
    """The LLM ids of the template after the image, before and after `{prompt}`: the common prefix and
    suffix of the ids two different prompts get there. A part that is only whitespace has none (the
    decoded instruction is stripped)."""
    if template.count("{prompt}") != 1 or template.count(image_token) != 1 \
            or template.index(image_token) > template.index("{prompt}"):
        raise ValueError(f"prompt template {template!r}: it must hold one {image_token} and, after it, one {{prompt}}")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    head_text, tail_text = template.split(image_token)[1].split("{prompt}")

    def after_image(prompt: str) -> list[int]:
        ids = tokenizer(template.replace("{prompt}", prompt), add_special_tokens=False)["input_ids"]
        return ids[len(ids) - ids[::-1].index(image_id):]

    first, second = after_image("what is shown"), after_image("where is the blue square")
    shorter = min(len(first), len(second))
    head = next((i for i in range(shorter) if first[i] != second[i]), shorter) if head_text.strip() else 0
    tail = next((i for i in range(shorter - head) if first[-1 - i] != second[-1 - i]), shorter - head) \
        if tail_text.strip() else 0
    return first[:head], first[len(first) - tail:]


def load_text_tower(directory: str | Path, tokenizer, template: str, tower, feature_layer: int,
                    image_token: str = "<image>") -> TextTower:
    """The text tower of the CLIP checkpoint in `directory`, checked against the LLaVA `tower`.

    tokenizer: the LLaVA model's (to read the instruction back from its ids); template: its prompt
    template; tower: the LLaVA vision tower; feature_layer: the layer LLaVA reads (0-based). The
    checkpoint's embeddings, pre-layernorm and encoder layers up to the feature layer (what LLaVA
    runs) must equal the tower's, to the rounding of the tower's dtype.
    """
    from transformers import AutoTokenizer, CLIPModel

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no CLIP checkpoint (config.json) for the text tower; fetch or build "
                                f"the model with its companion first")
    clip = CLIPModel.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                     attn_implementation=TEXT_ATTENTION).eval()
    _require_tower_weights(clip.vision_model, tower, feature_layer, directory)
    clip_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return _text_tower(clip.text_model, clip.text_projection, clip.vision_model.post_layernorm, clip.visual_projection,
                       clip_tokenizer, tokenizer, template, tower, image_token)


def model_text_tower(model_dir: str | Path, tokenizer, template: str, model, feature_layer: int) -> TextTower:
    """The text tower of a fetched (or toy-built) LLaVA model: its manifest's `clip` companion."""
    from ficoco.fingerprint import read_manifest

    companion = read_manifest(model_dir).get("clip")
    if not companion:
        raise FileNotFoundError(f"{model_dir}: the model has no CLIP companion (manifest key 'clip'); a method that "
                                f"reads the instruction needs the text tower of its vision tower's checkpoint: give "
                                f"the model a text_tower in config/models.yaml (a toy model: recipe staged) and fetch "
                                f"it again")
    return load_text_tower(Path(model_dir) / companion["dir"], tokenizer, template, model.model.vision_tower,
                           feature_layer)


def random_text_tower(model, clip_config=None, seed: int = 0) -> TextTower:
    """A random-weight text tower beside a random-weight LLaVA (timings: the cost does not depend on the
    weights). Its post-layernorm is the tower's own; `clip_config` (a `CLIPConfig`, e.g. the fetched
    companion's) gives the text tower's shape, by default CLIP ViT-L/14-336's. No vision model is built:
    the random LLaVA's tower stands for it. The prompts are random ids, so a word-level tokenizer over
    the LLM's ids ("w<id>") serves as both tokenizers and the template is "<image>{prompt}"."""
    import copy

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if clip_config is None:
        text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                     projection_dim=768)
    else:
        text_config = CLIPTextConfig(**{**clip_config.text_config.to_dict(),
                                        "projection_dim": clip_config.projection_dim})
    vocab = model.config.get_text_config().vocab_size
    text_config.vocab_size = max(text_config.vocab_size, vocab)
    tower = model.model.vision_tower
    torch.manual_seed(seed)
    text = CLIPTextModelWithProjection._from_config(text_config, attn_implementation=TEXT_ATTENTION).eval()
    visual_projection = torch.nn.Linear(tower.config.hidden_size, text_config.projection_dim, bias=False)
    tokenizer = id_tokenizer(vocab, model.config.image_token_id)
    return _text_tower(text.text_model, text.text_projection, copy.deepcopy(tower.post_layernorm).float(),
                       visual_projection, tokenizer, tokenizer, "<image>{prompt}", tower, "<image>")


def id_tokenizer(vocab_size: int, image_token_id: int):
    """A word-level tokenizer whose word for id i is "w<i>", and "<image>" for the image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {("<image>" if i == image_token_id else f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(words, unk_token=next(iter(words))))   # every id has a word
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens={"image_token": "<image>"})


def _text_tower(text_model, text_projection, post_layernorm, visual_projection, clip_tokenizer, llm_tokenizer,
                template: str, tower, image_token: str) -> TextTower:
    """The parts on the tower's device, with the template's edges read from the LLM tokenizer."""
    device = next(tower.parameters()).device
    head, tail = template_edges(llm_tokenizer, template, image_token)
    return TextTower(text_model=text_model.to(device), text_projection=text_projection.to(device),
                     post_layernorm=post_layernorm.to(device), visual_projection=visual_projection.to(device),
                     clip_tokenizer=clip_tokenizer, llm_tokenizer=llm_tokenizer, template_head=head,
                     template_tail=tail, template=template)


def _require_tower_weights(clip_vision, tower, feature_layer: int, directory: Path) -> None:
    used = ("embeddings.", "pre_layrnorm.", *(f"encoder.layers.{layer}." for layer in range(feature_layer + 1)))
    ours = tower.state_dict()
    theirs = clip_vision.state_dict()
    names = [name for name in ours if name.startswith(used)]
    missing = [name for name in names if name not in theirs or theirs[name].shape != ours[name].shape]
    if missing:
        raise ValueError(f"{directory}: this CLIP checkpoint does not have the LLaVA vision tower's shape "
                         f"({len(missing)} tensors differ, e.g. {missing[0]}); its text tower cannot score this "
                         f"model's visual tokens")
    dtype = next(tower.parameters()).dtype
    tolerance = 2 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    differing = [name for name in names
                 if not torch.allclose(ours[name].float().cpu(), theirs[name].float(), rtol=tolerance, atol=tolerance)]
    if differing:
        raise ValueError(f"{directory}: this CLIP checkpoint's vision weights are not the LLaVA vision tower's "
                         f"({len(differing)} of {len(names)} tensors differ, e.g. {differing[0]}); CDPruner needs the "
                         f"text tower of the checkpoint the tower came from")
