"""Adapting pretrained weights to a task: other channels, another resolution, a new head."""

import numpy as np
import pytest

import models
from research import convert, pretrained, train, tree
from tests import reference


def test_input_conv_for_one_channel_sums_rgb():
    kernel = np.random.default_rng(0).standard_normal((7, 7, 3, 64)).astype(np.float32)
    gray = pretrained.adapt_input_conv(kernel, 1)
    np.testing.assert_allclose(gray[:, :, 0], kernel.sum(axis=2), rtol=1e-6)


def test_input_conv_for_six_channels_keeps_the_response_to_a_flat_image():
    kernel = np.random.default_rng(0).standard_normal((3, 3, 3, 8)).astype(np.float32)
    six = pretrained.adapt_input_conv(kernel, 6)
    assert six.shape == (3, 3, 6, 8)
    np.testing.assert_allclose(six.sum(axis=2), kernel.sum(axis=2), rtol=1e-5)


def test_position_embedding_resampling_keeps_the_class_token_and_smooth_grids():
    rows, cols = np.meshgrid(np.arange(14.0), np.arange(14.0), indexing="ij")
    grid = np.stack([rows, cols], -1).reshape(1, 196, 2)
    embedding = np.concatenate([np.full((1, 1, 2), 7.0), grid], axis=1).astype(np.float32)
    same = pretrained.resample_position_embedding(embedding, 197)
    np.testing.assert_allclose(same, embedding, atol=1e-5)
    small = pretrained.resample_position_embedding(embedding, 1 + 7 * 7)
    assert small.shape == (1, 50, 2) and (small[0, 0] == 7.0).all()
    assert np.all(np.diff(small[0, 1:, 0].reshape(7, 7), axis=0) > 0)  # rows still increase


@pytest.mark.slow
def test_converted_resnet_fine_tunes_on_grayscale_fashion_mnist(make_config, tmp_path):
    torch = reference.torch_or_skip()
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    reference.randomise_batchnorm(ref)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    _, variables, meta = convert.convert("torchvision", "resnet18", tmp_path / "r18.pth")
    convert.write(tmp_path / "r18", variables, meta)
    cfg = make_config("fashion_mnist.py", f"init.checkpoint='{tmp_path / 'r18'}',model.name='',"
                      "data.mean=None,data.std=None,data.image_size=32,data.per_class=4,"
                      "data.classes=(0,1,2,3),train.batch_size=16,train.epochs=2.0,"
                      "freeze.depth=1,init.zero_head=True")
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    params = tree.flatten(result["state"].params)
    rgb = tree.flatten(variables["params"])["stem/conv1/kernel"]
    np.testing.assert_allclose(params["stem/conv1/kernel"][:, :, 0], rgb.sum(axis=2), rtol=1e-5)
    assert params["head/kernel"].shape == (512, 4) and np.isfinite(result["train_loss"])
    assert pretrained.load(tmp_path / "run").meta["preprocess"]["mean"][0] == pytest.approx(123.675)


def test_vit_fine_tunes_at_another_resolution_with_one_channel(make_config, tmp_path):
    model = models.create("vit_ti16", num_classes=1000)
    # key 7, not train.seed (0): a loader that kept the fresh weights fails
    variables = models.init_variables(model, __import__("jax").random.key(7), 224)
    meta = dict(model=pretrained.model_meta("vit_ti16", model, {}),
                preprocess={"mean": [127.5] * 3, "std": [127.5] * 3, "input_size": 224})
    convert.write(tmp_path / "vit", variables, meta)
    cfg = make_config("fashion_mnist.py", f"init.checkpoint='{tmp_path / 'vit'}',model.name='',"
                      "data.mean=None,data.std=None,data.image_size=32,data.per_class=4,"
                      "data.classes=(0,1),train.batch_size=8,train.epochs=1.0")
    start = tree.flatten(train.build(cfg).state.params)
    source = tree.flatten(variables["params"])
    np.testing.assert_array_equal(start["block05/attn/query/kernel"],
                                  source["block05/attn/query/kernel"])
    assert start["head/kernel"].shape == (192, 2)
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    params = tree.flatten(result["state"].params)
    assert params["embed/pos_embedding"].shape == (1, 5, 192)
    assert params["embed/patch/kernel"].shape == (16, 16, 1, 192)
    assert np.isfinite(result["train_loss"])


@pytest.mark.parametrize("zero_head", [True, False])
def test_zero_head_zeroes_the_fresh_head_and_keeps_the_loaded_blocks(make_config, tmp_path,
                                                                     zero_head):
    """A ResNet's fresh head is random, so that a zero head shows ``init.zero_head`` at work."""
    model = models.create("resnet_small", num_classes=10, in_chans=1)
    variables = models.init_variables(model, __import__("jax").random.key(7), 28)
    meta = dict(model=pretrained.model_meta("resnet_small", model, {}),
                preprocess={"mean": [127.5], "std": [127.5], "input_size": 28})
    convert.write(tmp_path / "source", variables, meta)
    cfg = make_config("fashion_mnist.py", f"init.checkpoint='{tmp_path / 'source'}',"
                      f"model.name='',data.classes=(0,1,2),init.zero_head={zero_head}")
    start = tree.flatten(train.build(cfg).state.params)
    assert (np.all(start["head/kernel"] == 0) and np.all(start["head/bias"] == 0)) == zero_head
    assert start["head/kernel"].shape == (64, 3)
    np.testing.assert_array_equal(start["stage2/block0/conv1/kernel"],
                                  tree.flatten(variables["params"])["stage2/block0/conv1/kernel"])
