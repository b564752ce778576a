import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research import pretrained
from research.convert import convert_file, vit_npz
from research.convert import timm as timm_convert
from research.errors import CheckpointError
from tests import reference
from tests.research.test_timm import timm_model

ROOT = Path(__file__).resolve().parents[2]

# (our registry name, image size): every ViT at 224, two at 384, whose checkpoints' longer
# position embeddings the converter must read as a larger grid.
CASES = [("vit_ti16", 224), ("vit_ti16", 384),
         *[pytest.param(arch, size, marks=pytest.mark.slow) for arch, size in [
             ("vit_s16", 224), ("vit_s32", 224), ("vit_b16", 224), ("vit_b32", 224),
             ("vit_b32", 384), ("vit_l16", 224), ("vit_l32", 224)]]]


def timm_vit(arch: str, size: int = 224):
    """timm's ViT of our ``arch`` for ``size`` px images, with random weights."""
    ref = timm_model(timm_convert.timm_name(arch), img_size=size)
    reference.randomise_constants(ref)
    return ref


def google_arrays(ref) -> dict[str, np.ndarray]:
    """timm's ViT ``ref`` in the layout of Google's vision_transformer checkpoints (the
    inverse of timm's ``_load_weights``)."""
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    width, heads = ref.embed_dim, ref.blocks[0].attn.num_heads
    arrays = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        vit_npz.POS_EMBEDDING: sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(ref.blocks)):
        theirs, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for norm, torch_norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{theirs}{norm}/scale"] = sd[f"{ours}{torch_norm}.weight"]
            arrays[f"{theirs}{norm}/bias"] = sd[f"{ours}{torch_norm}.bias"]
        attention = f"{theirs}MultiHeadDotProductAttention_1/"
        for name, weight, bias in zip(("query", "key", "value"),
                                      np.split(sd[f"{ours}attn.qkv.weight"], 3),
                                      np.split(sd[f"{ours}attn.qkv.bias"], 3)):
            arrays[f"{attention}{name}/kernel"] = weight.T.reshape(width, heads, -1)
            arrays[f"{attention}{name}/bias"] = bias.reshape(heads, -1)
        arrays[f"{attention}out/kernel"] = sd[f"{ours}attn.proj.weight"].T.reshape(heads, -1, width)
        arrays[f"{attention}out/bias"] = sd[f"{ours}attn.proj.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            arrays[f"{theirs}MlpBlock_3/{dense}/kernel"] = sd[f"{ours}mlp.{fc}.weight"].T
            arrays[f"{theirs}MlpBlock_3/{dense}/bias"] = sd[f"{ours}mlp.{fc}.bias"]
    return arrays


def write_npz(ref, path: Path) -> Path:
    np.savez(path, **google_arrays(ref))
    return path


@pytest.mark.parametrize("arch,size", CASES)
def test_logits_match_timm_reading_the_same_file(arch, size, tmp_path):
    torch = reference.torch_or_skip()
    ref = timm_vit(arch, size)
    path = write_npz(ref, tmp_path / f"{arch}.npz")
    loaded = timm_model(timm_convert.timm_name(arch), img_size=size)
    with torch.no_grad():
        for param in loaded.parameters():
            param.zero_()
    loaded.load_pretrained(str(path))  # timm's reader of Google's checkpoints
    for key, value in ref.state_dict().items():  # the file holds every tensor of ref
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), key)
    model, variables = convert_file("vit_npz", path, arch)
    assert vit_npz.preprocessing(arch, vit_npz.read(path))["input_size"] == size
    x = reference.random_images(size)
    np.testing.assert_allclose(reference.flax_logits(model, variables, x),
                               reference.torch_logits(loaded, x), atol=1e-4, rtol=0)


def test_missing_arrays_are_named(tmp_path):
    arrays = google_arrays(timm_vit("vit_ti16"))
    del arrays["Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel"], arrays["cls"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(CheckpointError) as error:
        convert_file("vit_npz", tmp_path / "partial.npz", "vit_ti16")
    message = str(error.value)
    assert "partial.npz" in message and "missing (2)" in message
    assert {"    cls", "    Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel"
            } <= set(message.splitlines())


def test_checkpoint_of_another_size_lists_paths(tmp_path):
    path = write_npz(timm_vit("vit_ti16"), tmp_path / "ti16.npz")
    with pytest.raises(CheckpointError) as error:
        convert_file("vit_npz", path, "vit_s16")
    message = str(error.value)
    assert "ti16.npz" in message
    assert "params/block00/attn/key/kernel: (192, 3, 64) in" in message  # mis-shaped


def test_truncated_npz_names_the_file(tmp_path):
    np.savez(tmp_path / "w.npz", cls=np.zeros((1, 1, 192), np.float32))
    data = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "w.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="w.npz.*truncated"):
        convert_file("vit_npz", tmp_path / "w.npz", "vit_ti16")


def test_convert_script_stores_unit_range_preprocessing(tmp_path):
    ref = timm_vit("vit_ti16")
    path = write_npz(ref, tmp_path / "ti16.npz")
    done = subprocess.run([sys.executable, "-m", "scripts.convert", "--source", "vit_npz",
                           "--arch", "vit_ti16", "--input", str(path), "--output",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(tmp_path / "out")
    assert loaded.meta["preprocess"]["input_size"] == 224
    reference.assert_checkpoint_matches(loaded, ref, lambda raw: raw / 127.5 - 1)
