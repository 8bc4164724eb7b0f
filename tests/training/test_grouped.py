"""Grouped expressions (``data.expressions_per_image``): one image encoding for several expressions.

The loss and every gradient of a grouped batch equal those of the same (image, expression) pairs
computed one by one; the grouped sampler visits every record once per epoch, keeps a group's
records together with one augmentation seed, and is reproducible and resumable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import MICRO_OVERRIDES, grad_mismatch, nontrivial_weights

from rsrefseg.data.datasets import ReferringDataset
from rsrefseg.data.grouping import collate_grouped, unique_images
from rsrefseg.data.records import read_jsonl
from rsrefseg.training.data import AugmentedView, EpochBatchSampler
from rsrefseg.training.train import LossModule

TEXTS = ["the red square", "the square on the left", "the blue circle", "the circle on the right",
         "the red square", "the largest blue thing"]
IMAGE_INDEX = [0, 0, 1, 2, 2, 2]


def _lora_model():
    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_preset("tiny", finetune="lora", lora_dropout=0.0, **MICRO_OVERRIDES)
    return nontrivial_weights(model).train()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_grouped_loss_and_gradients_equal_the_pairs_one_by_one() -> None:
    torch.manual_seed(0)
    model = _lora_model()
    loss_module = LossModule(model, bce_weight=5.0, dice_weight=1.0, activation_weight=2.0)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255  # U = 3 images
    masks = (torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.8).float()  # T = 6
    index = torch.tensor(IMAGE_INDEX)

    encoded: list[int] = []
    hook = model.sam.vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    grouped = loss_module(images, TEXTS, masks, index)
    grouped.backward()
    hook.remove()
    assert encoded == [3], "the image encoder should run once, on the 3 distinct images"
    got = _grads(model)

    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for t in range(len(TEXTS)):  # each pair alone: its own image encoding, batch of one
        loss = loss_module(images[IMAGE_INDEX[t]][None], [TEXTS[t]], masks[t][None]) / len(TEXTS)
        loss.backward()
        total += loss.detach()
    expected = _grads(model)

    assert abs(float(grouped.detach()) - float(total)) <= 1e-5 * abs(float(total))
    assert got.keys() == expected.keys()
    assert any("lora_" in n for n in expected) and all(".lora_" in n or not n.startswith("sam.vision") for n in expected)
    # the gradients are not trivially zero: LoRA of the SAM encoder and of both towers receive some
    for part in ("sam.vision_encoder", "clip.model.vision_model", "clip.model.text_model"):
        assert any(float(g.abs().max()) > 0 for n, g in expected.items() if n.startswith(part) and "lora_A" in n), part
    worst, where = grad_mismatch(got, expected)
    assert worst <= 1e-5, f"gradient of {where} differs by {worst:.2e} (relative)"


def test_forward_with_image_index_equals_repeated_images() -> None:
    model = _lora_model().eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255
    index = torch.tensor(IMAGE_INDEX)
    with torch.no_grad():
        grouped = model(images, TEXTS, index).mask_logits
        plain = model(images[index], TEXTS).mask_logits
    assert plain.abs().max() > 1e-2  # non-trivial logits
    assert torch.allclose(grouped, plain, atol=1e-5 * float(plain.abs().max()))
    with pytest.raises(ValueError, match="image indices"):
        model(images, TEXTS[:5], index)


def _keys(per_image: list[int]) -> list[str]:
    rng = np.random.default_rng(0)
    keys = [f"img{i}.png" for i, c in enumerate(per_image) for _ in range(c)]
    return [keys[i] for i in rng.permutation(len(keys))]  # records of an image scattered in the file


@pytest.mark.parametrize("per_image", [2, 3, 4])
def test_grouped_sampler_visits_every_record_once_in_groups(per_image: int) -> None:
    keys = _keys([1, 2, 5, 3, 4, 1, 6])  # 22 records of 7 images
    n = len(keys)
    sampler = EpochBatchSampler(n, 5, seed=3, image_keys=keys, per_image=per_image)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        flat = [pair for batch in sampler for pair in batch]
        assert sorted(i for i, _ in flat) == list(range(n))  # every record exactly once
        assert [len(b) for b in sampler] == [5, 5, 5, 5, 2]  # batch_size counts expressions
        # runs of the same image in the order are groups: at most per_image long, one seed each
        runs: list[list[tuple[int, int]]] = []
        for pair in flat:
            if runs and keys[runs[-1][0][0]] == keys[pair[0]] and runs[-1][0][1] == pair[1]:
                runs[-1].append(pair)
            else:
                runs.append([pair])
        assert all(len(run) <= per_image for run in runs)
        for key in set(keys):  # the images's records are cut into as few groups as per_image allows
            count = keys.count(key)
            assert sum(1 for run in runs if keys[run[0][0]] == key) == -(-count // per_image)
    again = EpochBatchSampler(n, 5, seed=3, image_keys=keys, per_image=per_image)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # reproducible from (seed, epoch)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    again.set_epoch(1, start_batch=3)
    sampler.set_epoch(1)
    assert list(again) == list(sampler)[3:]  # resumes at any batch


def test_grouped_sampler_shards_contiguously_across_processes() -> None:
    keys = _keys([3, 3, 2, 4, 3])  # 15 records
    whole = EpochBatchSampler(15, 4, seed=1, image_keys=keys, per_image=3)
    order = [i for b in whole for i, _ in b]
    shards = [[i for b in EpochBatchSampler(15, 4, 1, True, r, 2, keys, 3) for i, _ in b] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 8
    assert shards[0] + shards[1][:7] == order and shards[1][7] == order[0]  # padding repeats the start
    with pytest.raises(ValueError, match="image key"):
        EpochBatchSampler(15, 4, seed=1, per_image=2)


def test_unique_images_is_exact() -> None:
    base = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    flipped = base[0].flip(-1)
    nudged = base[0].clone()
    nudged.view(-1)[1] += 1  # one value off, outside the strided sample of the lookup key
    batch = torch.stack([base[0], base[1], base[0], flipped, base[2], base[1], nudged])
    unique, index = unique_images(batch)
    assert unique.shape[0] == 5 and index.tolist() == [0, 1, 0, 2, 3, 1, 4]
    assert torch.equal(unique[index], batch)
    same, ident = unique_images(base)
    assert same is base and ident.tolist() == [0, 1, 2]


def test_grouped_batches_flip_all_expressions_of_an_image_alike(synthetic: dict[str, Path]) -> None:
    records = read_jsonl(synthetic["train"])
    dataset = ReferringDataset(records, synthetic["images"], 64)
    view = AugmentedView(dataset, p_h=0.5, p_v=0.5)
    keys = [r.file_name for r in records]
    sampler = EpochBatchSampler(len(records), 6, seed=0, image_keys=keys, per_image=2)
    flipped_texts = 0
    for batch_pairs in sampler:
        batch = collate_grouped([view[pair] for pair in batch_pairs])
        groups = {(keys[i], seed) for i, seed in batch_pairs}
        assert batch["pixel_values"].shape[0] == len(groups)  # one (identically flipped) image per group
        for t, (i, _) in enumerate(batch_pairs):
            alone = view[batch_pairs[t]]
            assert torch.equal(batch["pixel_values"][batch["image_index"][t]], alone["pixel_values"])
            assert torch.equal(batch["mask"][t], alone["mask"]) and batch["text"][t] == alone["text"]
            flipped_texts += batch["text"][t] != records[i].sent
    assert flipped_texts > 0  # some "left"/"right" words were rewritten with their image's flip


def test_config_refuses_bad_group_sizes_and_switches() -> None:
    from rsrefseg.errors import ConfigError
    from rsrefseg.training.train_config import load_config

    assert load_config(None).data.expressions_per_image == 1 and not load_config(None).gradient_checkpointing
    for overrides, message in (({"data.expressions_per_image": 0}, "must be >= 1, got 0"),
                               ({"data.expressions_per_image": 2.5}, "expected an integer"),
                               ({"gradient_checkpointing": "maybe"}, "expected true/false")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
