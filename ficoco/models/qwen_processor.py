"""The processor of a Qwen2-VL-family model directory, for images and text (no videos).

transformers 5.x's `Qwen2VLProcessor` always loads a video processor, and that needs torchvision, which the
lock leaves out (it pulls the CUDA packages). So an evaluate job builds this one from the directory's own
parts: its image processor (the PIL backend: the same `smart_resize`, normalisation and patch layout) and its
tokenizer. What the Qwen processor adds, it does here in the same way: each prompt's image token becomes the
image's placeholders, patch grid / merge² of them (`Qwen2VLProcessor.replace_image_token`), and
`mm_token_type_ids` marks them with 1 (M-RoPE reads it).

Image sizes are held to the model's nominal limits: `min_pixels` and `max_pixels` of its `QwenVLDims` (at most
1,280 LLM tokens an image, the Qwen2-VL model card's recommended setting), whatever the directory's
preprocessor_config.json says (the hub's allow 16,384): they are passed with every call, and every image's patch
grid must be the one `QwenVLDims.patch_grid` predicts from its size, or the job fails (InvariantViolation).
"""
from __future__ import annotations

from pathlib import Path


class QwenVLImageTextProcessor:
    """`processor(images=..., text=..., return_tensors="pt", padding=True)` as a Qwen2-VL processor answers for
    images: input_ids, attention_mask, mm_token_type_ids, pixel_values (patches, C·T·p·p), image_grid_thw."""

    def __init__(self, image_processor, tokenizer, dims):
        self.image_processor, self.tokenizer, self.dims = image_processor, tokenizer, dims
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {self.image_token!r}: not a Qwen2-VL tokenizer")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dims) -> "QwenVLImageTextProcessor":
        """The directory's image processor (limited to `dims`' pixel range) and tokenizer, local files only;
        refuses an image processor whose patch geometry is not the model's (`dims`, a `QwenVLDims`)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        geometry = (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size)
        expected = (dims.patch_size, dims.merge_size, dims.temporal_patch_size)
        if geometry != expected:
            raise ValueError(f"{model_dir}: the image processor's (patch_size, merge_size, temporal_patch_size) = "
                             f"{geometry}; the model's are {expected}")
        return cls(image_processor, AutoTokenizer.from_pretrained(model_dir, local_files_only=True), dims)

    def __call__(self, images=None, text=(), return_tensors: str = "pt", padding: bool = True):
        from transformers import BatchFeature

        from ficoco.invariants import InvariantViolation

        texts, features = list(text), {}
        if images is not None:
            size = {"shortest_edge": self.dims.min_pixels, "longest_edge": self.dims.max_pixels}
            features = dict(self.image_processor(images=images, size=size, return_tensors=return_tensors))
            grids = [grid[1:] for grid in features["image_grid_thw"].tolist()]
            expected = [list(self.dims.patch_grid(image.height, image.width)) for image in images]
            if grids != expected:
                raise InvariantViolation(f"the image processor gave patch grids {grids} for images of (height, width) "
                                         f"{[(image.height, image.width) for image in images]}; the model's "
                                         f"dimensions give {expected} (QwenVLDims.patch_grid)")
            merge = self.image_processor.merge_size
            placeholders = iter((features["image_grid_thw"].prod(-1) // merge ** 2).tolist())
            images_in_texts = sum(prompt.count(self.image_token) for prompt in texts)
            if images_in_texts != len(features["image_grid_thw"]):
                raise ValueError(f"{len(features['image_grid_thw'])} images for {images_in_texts} image tokens "
                                 f"({self.image_token}) in the prompts: one each")
            texts = [self._expand(prompt, placeholders) for prompt in texts]
        encoded = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return BatchFeature({**encoded, **features})

    def _expand(self, prompt: str, placeholders) -> str:
        """Each image token of `prompt` repeated as often as its image has placeholders (reading order)."""
        first, *rest = prompt.split(self.image_token)
        return first + "".join(self.image_token * next(placeholders) + part for part in rest)
