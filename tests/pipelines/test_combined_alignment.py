"""Combined pipelines: image-like inputs given once per prompt are repeated per image; single inputs are not."""

import torch

from kandinsky22.pipelines.combined import _per_image


def test_one_chw_image_is_not_mistaken_for_a_batch_of_prompts():
    image = torch.rand(3, 8, 8)  # one CHW image; 3 prompts, 2 images each
    assert _per_image("image", image, num_prompts=3, n=2) is image
    assert _per_image("hint", image, num_prompts=3, n=2) is image


def test_per_prompt_batches_are_repeated_per_image_in_prompt_order():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    out = _per_image("image", images, num_prompts=3, n=2)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    masks = torch.arange(3.0).view(3, 1, 1).expand(3, 4, 4)  # (B, H, W) masks
    assert _per_image("mask_image", masks, num_prompts=3, n=2)[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert _per_image("image", ["a", "b", "c"], num_prompts=3, n=2) == ["a", "a", "b", "b", "c", "c"]
