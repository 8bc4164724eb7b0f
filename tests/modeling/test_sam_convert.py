"""Meta SAM checkpoint -> Hugging Face SamModel, checked numerically against ``segment_anything``.

A small randomly initialised ``segment_anything`` Sam is saved as a ``.pth`` file, loaded through
:func:`load_meta_sam_checkpoint`, and both models are run on the same inputs. ``segment_anything``
imports torchvision at import time (only for its predictor/mask-generator helpers, which are not
used here); those torchvision names are replaced by placeholders, nothing else is stubbed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rsrefseg.errors import CheckpointMismatchError, WeightsError
from rsrefseg.modeling.sam_convert import (
    META_SAM_VARIANTS,
    convert_meta_sam_state_dict,
    infer_variant,
    is_meta_sam_checkpoint,
    load_meta_sam_checkpoint,
    sam_config_for_variant,
)

IMAGE = 128  # 8 x 8 embedding grid, 32 x 32 low-resolution masks
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "global_attn_indexes": [1],
    "image_size": IMAGE,
    "window_size": 4,
}
TOL = 1e-5


def _placeholder(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("torchvision placeholder: not available in this test")


def _fake_torchvision() -> dict[str, types.ModuleType]:
    """Placeholders for the names segment_anything imports from torchvision at import time."""
    modules = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    functional = modules["torchvision.transforms.functional"]
    functional.resize = _placeholder  # type: ignore[attr-defined]  # utils/transforms.py
    functional.to_pil_image = _placeholder  # type: ignore[attr-defined]
    boxes = modules["torchvision.ops.boxes"]
    boxes.batched_nms = _placeholder  # type: ignore[attr-defined]  # automatic_mask_generator.py
    boxes.box_area = _placeholder  # type: ignore[attr-defined]
    return modules


@pytest.fixture(scope="module")
def segment_anything() -> Iterator[types.ModuleType]:
    """The ``segment_anything`` package, imported with torchvision placeholders, then forgotten again."""
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything==1.0 (dev extra) is not installed")
    import transformers.models.sam.modeling_sam  # noqa: F401  # import it before torchvision is faked

    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:  # the placeholders live only during the import
        if importlib.util.find_spec("torchvision") is None:
            for name, module in _fake_torchvision().items():
                patch.setitem(sys.modules, name, module)
        import segment_anything

    yield segment_anything
    for name in set(sys.modules) - before:
        if name.startswith("segment_anything"):
            del sys.modules[name]


def _randomise(model: nn.Module, seed: int) -> None:
    """Give every parameter and buffer non-trivial values (zero-initialised ones included)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator)

    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if tensor.ndim >= 2:  # weights, embeddings, rel_pos tables, pos_embed, PE matrix
                fan_in = tensor[0].numel() if "positional_encoding" not in name else 1
                tensor.copy_(rand(tensor) / fan_in**0.5)
            elif name.endswith("weight"):  # (layer) norm scales
                tensor.copy_(1.0 + 0.2 * rand(tensor))
            else:
                tensor.copy_(0.2 * rand(tensor))


@pytest.fixture(scope="module")
def meta_sam(segment_anything: types.ModuleType) -> nn.Module:
    """A small Meta Sam built like ``build_sam._build_sam``, randomised with a fixed seed."""
    m = segment_anything.modeling
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=IMAGE,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=256,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=[1],
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(8, 8), input_image_size=(IMAGE, IMAGE), mask_in_chans=16
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    _randomise(sam, seed=0)
    return sam.eval()


@pytest.fixture(scope="module")
def checkpoint(meta_sam: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Meta model saved like Meta's release files (which also hold pixel_mean/pixel_std)."""
    state = dict(meta_sam.state_dict())
    state["pixel_mean"] = meta_sam.pixel_mean.clone()
    state["pixel_std"] = meta_sam.pixel_std.clone()
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def hf_sam(request: pytest.FixtureRequest, checkpoint: Path) -> Any:
    """The converted model, loaded with the decoder layer-norm eps of Meta's code (see config)."""
    return load_meta_sam_checkpoint(
        checkpoint, "vit_b", attn_implementation=request.param, mask_decoder_layer_norm_eps=1e-5, **SMALL
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(1, 3, IMAGE, IMAGE, generator=generator),  # already normalised
        "box": torch.tensor([[14.0, 30.0, 90.0, 101.0]]),
        "mask": torch.randn(1, 1, 32, 32, generator=generator) * 4,
        "points": torch.tensor([[[20.0, 40.0], [70.0, 33.0], [100.0, 120.0]]]),
        "labels": torch.tensor([[1, 0, 1]]),
    }


def test_converted_keys_are_exactly_the_hf_state_dict(meta_sam: nn.Module, hf_sam: Any) -> None:
    converted = convert_meta_sam_state_dict(meta_sam.state_dict() | {"pixel_mean": torch.zeros(3, 1, 1)})
    assert set(converted) == set(hf_sam.state_dict())
    gaussian = meta_sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.equal(hf_sam.shared_image_embedding.positional_embedding, gaussian)
    assert (
        hf_sam.prompt_encoder.shared_embedding.positional_embedding
        is hf_sam.shared_image_embedding.positional_embedding
    )
    assert not hf_sam.training


@torch.no_grad()
def test_matches_segment_anything(meta_sam: nn.Module, hf_sam: Any) -> None:
    x = _inputs()
    report: dict[str, float] = {}

    # (a) image embeddings: 1 x 256 x 8 x 8
    meta_embed = meta_sam.image_encoder(x["image"])
    hf_embed = hf_sam.get_image_embeddings(x["image"])
    assert meta_embed.std() > 0.5
    report["image_embeddings"] = _max_diff(meta_embed, hf_embed)

    # (d) image-wide positional encoding: 1 x 256 x 8 x 8
    report["dense_pe"] = _max_diff(
        meta_sam.prompt_encoder.get_dense_pe(), hf_sam.get_image_wide_positional_embeddings()
    )

    # (b) prompt encoder: box + mask (sparse 1 x 2 x 256, dense 1 x 256 x 8 x 8) and points only
    meta_sparse, meta_dense = meta_sam.prompt_encoder(points=None, boxes=x["box"], masks=x["mask"])
    hf_sparse, hf_dense = hf_sam.get_prompt_embeddings(input_boxes=x["box"][:, None], input_masks=x["mask"])
    report["box_sparse"] = _max_diff(meta_sparse, hf_sparse[:, 0])
    report["mask_dense"] = _max_diff(meta_dense, hf_dense)
    meta_pts, meta_nomask = meta_sam.prompt_encoder(points=(x["points"], x["labels"]), boxes=None, masks=None)
    hf_pts, hf_nomask = hf_sam.get_prompt_embeddings(
        input_points=x["points"][:, None], input_labels=x["labels"][:, None]
    )
    report["points_sparse"] = _max_diff(meta_pts, hf_pts[:, 0])  # 3 points + padding point
    report["no_mask_dense"] = _max_diff(meta_nomask, hf_nomask)

    # (c) mask decoder from the same image embedding: masks 1 x k x 32 x 32, iou 1 x k
    for multimask in (False, True):
        for prompt, (sparse, dense), hf_kwargs in (
            (
                "box+mask",
                (meta_sparse, meta_dense),
                {"input_boxes": x["box"][:, None], "input_masks": x["mask"]},
            ),
            (
                "points",
                (meta_pts, meta_nomask),
                {"input_points": x["points"][:, None], "input_labels": x["labels"][:, None]},
            ),
        ):
            meta_masks, meta_iou = meta_sam.mask_decoder(
                image_embeddings=meta_embed,
                image_pe=meta_sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            out = hf_sam(image_embeddings=meta_embed, multimask_output=multimask, **hf_kwargs)
            assert meta_masks.shape[1] == (3 if multimask else 1)
            assert meta_masks.std() > 0.1
            report[f"masks[{prompt},multi={multimask}]"] = _max_diff(meta_masks, out.pred_masks[:, 0])
            report[f"iou[{prompt},multi={multimask}]"] = _max_diff(meta_iou, out.iou_scores[:, 0])

    print(f"\nmax abs diff ({hf_sam.config._attn_implementation}):")
    for name, diff in report.items():
        print(f"  {name:32s} {diff:.3e}")
    assert max(report.values()) < TOL, report


@torch.no_grad()
def test_hub_config_decoder_eps_is_close(meta_sam: nn.Module, checkpoint: Path) -> None:
    """With the hub configs' decoder eps (1e-6 instead of Meta's 1e-5) outputs stay close."""
    hf = load_meta_sam_checkpoint(checkpoint, "vit_b", **SMALL)
    x = _inputs()
    embed = meta_sam.image_encoder(x["image"])
    sparse, dense = meta_sam.prompt_encoder(points=None, boxes=x["box"], masks=x["mask"])
    masks, iou = meta_sam.mask_decoder(embed, meta_sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    out = hf(image_embeddings=embed, input_boxes=x["box"][:, None], input_masks=x["mask"])
    torch.testing.assert_close(out.pred_masks[:, 0], masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.iou_scores[:, 0], iou, rtol=1e-4, atol=1e-4)


def test_config_matches_official_shapes() -> None:
    for name, (dim, depth, heads, global_idx) in META_SAM_VARIANTS.items():
        config = sam_config_for_variant(name)
        vision = config.vision_config
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
            dim,
            depth,
            heads,
        )
        assert list(vision.global_attn_indexes) == list(global_idx)
        assert (vision.image_size, vision.patch_size, vision.window_size, vision.output_channels) == (
            1024,
            16,
            14,
            256,
        )
        assert vision.mlp_dim == 4 * dim and vision.use_rel_pos and vision.qkv_bias
        assert config.prompt_encoder_config.image_embedding_size == 64
        assert config.mask_decoder_config.mlp_dim == 2048


@pytest.mark.parametrize("name", sorted(META_SAM_VARIANTS))
def test_full_size_models_convert_key_for_key(segment_anything: types.ModuleType, name: str) -> None:
    """Meta's own vit_b/l/h builders (on the meta device) give exactly our configs' keys and shapes."""
    from transformers import SamModel

    with torch.device("meta"):
        meta_state = segment_anything.sam_model_registry[name]().state_dict()
        expected = SamModel(sam_config_for_variant(name)).state_dict()
    assert infer_variant(meta_state) == name
    converted = convert_meta_sam_state_dict(meta_state)
    assert set(converted) == set(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


def _shape_only(dim: int, depth: int) -> dict[str, torch.Tensor]:
    fake = {"image_encoder.patch_embed.proj.weight": torch.empty(dim, 3, 16, 16, device="meta")}
    for i in range(depth):
        fake[f"image_encoder.blocks.{i}.norm1.weight"] = torch.empty(dim, device="meta")
    return fake


@pytest.mark.parametrize("name", sorted(META_SAM_VARIANTS))
def test_infer_variant(name: str) -> None:
    spec = META_SAM_VARIANTS[name]
    assert infer_variant(_shape_only(spec.embed_dim, spec.depth)) == name


def test_infer_variant_unknown() -> None:
    with pytest.raises(WeightsError, match="unrecognised"):
        infer_variant(_shape_only(64, 2))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04truncated"])
def test_garbage_file_is_one_line_weights_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(content)
    assert is_meta_sam_checkpoint(path)
    with pytest.raises(WeightsError) as info:
        load_meta_sam_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_truncated_and_foreign_files(tmp_path: Path, checkpoint: Path) -> None:
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    missing = tmp_path / "absent.pth"
    for path in (truncated, foreign, missing):
        with pytest.raises(WeightsError) as info:
            load_meta_sam_checkpoint(path, "vit_b", **SMALL)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert not isinstance(info.value, CheckpointMismatchError)
    assert not is_meta_sam_checkpoint(missing) and not is_meta_sam_checkpoint(tmp_path)


def test_missing_and_unexpected_keys(tmp_path: Path, checkpoint: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    del state["image_encoder.blocks.1.attn.rel_pos_h"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_meta_sam_checkpoint(path, "vit_b", **SMALL)
    assert info.value.missing == ["image_encoder.blocks.1.attn.rel_pos_h"]
    assert info.value.unexpected == ["mask_decoder.extra_head.weight"]
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "image_encoder.blocks.1.attn.rel_pos_h" in message and "mask_decoder.extra_head.weight" in message


def test_variant_disagreeing_with_the_file(tmp_path: Path) -> None:
    fake = {k: torch.zeros(v.shape) for k, v in _shape_only(1024, 24).items()}  # a vit_l-shaped encoder
    fake["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(fake, path)
    with pytest.raises(
        CheckpointMismatchError, match="holds a SAM vit_l checkpoint, not the requested vit_b"
    ):
        load_meta_sam_checkpoint(path, "vit-b")
    with pytest.raises(CheckpointMismatchError) as info:  # inferred vit_l; the rest of the model is missing
        load_meta_sam_checkpoint(path)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in info.value.missing


def test_wrong_variant_and_shapes(checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as info:  # tiny file into the full vit_b model
        load_meta_sam_checkpoint(checkpoint, "vit_b")
    assert (
        "image_encoder.patch_embed.proj.weight (64, 3, 16, 16) vs (768, 3, 16, 16)"
        in info.value.shape_mismatch
    )
    assert "image_encoder.blocks.11.attn.qkv.weight" in info.value.missing
    assert "\n" not in str(info.value) and "(+" in str(info.value)  # long lists are cut short
    with pytest.raises(WeightsError, match="pass variant="):
        load_meta_sam_checkpoint(checkpoint)
