import pytest
from conftest import edit_manifest

from edge.bundle import BundleError, load_bundle


def test_valid_bundle_loads(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.input_size == (32, 32) and b.model_id == "tiny-test"
    assert b.decision["threshold"] == 0.5


def test_missing_key_is_named(tiny_bundle):
    edit_manifest(tiny_bundle, lambda m: m["decision"].pop("threshold"))
    with pytest.raises(BundleError, match="'decision.threshold' is missing"):
        load_bundle(tiny_bundle)


def test_wrong_type_is_named(tiny_bundle):
    edit_manifest(tiny_bundle, lambda m: m["decision"].update(threshold="high"))
    with pytest.raises(BundleError, match="'decision.threshold' should be int or float"):
        load_bundle(tiny_bundle)


def test_checksum_mismatch_names_the_file(tiny_bundle):
    with open(tiny_bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match"):
        load_bundle(tiny_bundle)


def test_not_json_missing_file_and_newer_format(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    (tiny_bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: listed in the manifest but missing"):
        load_bundle(tiny_bundle)
    edit_manifest(tiny_bundle, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="upgrade linegate"):
        load_bundle(tiny_bundle)
    (tiny_bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny_bundle)


def test_resize_and_upsample_keys_default_for_old_bundles_and_are_checked(tiny_bundle):
    b = load_bundle(tiny_bundle)  # written without either key, as bundles before them were
    assert b.interpolation == "area" and b.map_upsample == "bilinear"
    edit_manifest(tiny_bundle, lambda m: m["input"].update(interpolation="staged"))
    assert load_bundle(tiny_bundle).interpolation == "staged"
    edit_manifest(tiny_bundle, lambda m: m["input"].update(interpolation="cubic"))
    with pytest.raises(BundleError, match="'input.interpolation' is 'cubic'; expected one of area, staged"):
        load_bundle(tiny_bundle)
    edit_manifest(tiny_bundle, lambda m: (m["input"].pop("interpolation"),
                                          m["outputs"]["map"].update(upsample="nearest")))
    with pytest.raises(BundleError, match="'outputs.map.upsample' is 'nearest'"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["decision"].update(threshold=float("nan")), "'decision.threshold' is nan; it must be a finite"),
    (lambda m: m["decision"]["normalisation"].update(max=float("inf")), "'decision.normalisation.max' is inf"),
    (lambda m: m.update(display_range=[1.0]), r"'display_range' is \[1.0\]; expected \[low, high\]"),
    (lambda m: m.update(display_range=[0.5, 0.5]), r"'display_range' is \[0.5, 0.5\]"),
    (lambda m: m.update(display_range=["a", "b"]), "'display_range'"),
    (lambda m: m["input"].update(shape=[-1, 3, "height", "width"]), "height and width must be positive integers"),
    (lambda m: m["input"].update(colour="BGR"), "'input.colour' is 'BGR'; this runtime only implements 'RGB'"),
    (lambda m: m["input"].update(resize="letterbox"), "'input.resize' is 'letterbox'"),
    (lambda m: m["input"]["normalisation"].update(where="runtime"), "'input.normalisation.where' is 'runtime'"),
    (lambda m: m["decision"].update(reject_if="score < threshold"), "'decision.reject_if'"),
    (lambda m: m["outputs"]["score"].update(aggregate="max"), "'outputs.score.aggregate' is 'max'"),
    (lambda m: m["decision"].update(aggregate="topk:abc"), r"'decision.aggregate': aggregate 'topk:abc': P must be a number in \(0, 100\]"),
    (lambda m: m.update(files={}), "'files' lists no model file"),
], ids=["nan-threshold", "inf-norm", "short-range", "empty-range", "text-range", "named-shape", "bgr",
        "letterbox", "runtime-normalisation", "reject-below", "graph-max", "bad-topk", "no-files"])
def test_values_the_runtime_cannot_honour_are_refused(tiny_bundle, edit, message):
    """json reads NaN and Infinity, and a key can hold a convention this runtime does not
    implement: each would load and then run silently wrong (a NaN threshold accepts every
    part) or fail at the first overlay, so loading refuses them, naming the key."""
    edit_manifest(tiny_bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny_bundle)
