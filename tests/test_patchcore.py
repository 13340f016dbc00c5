"""PatchCore: nearest-bank distances by matrix products against a brute-force reference, the
greedy coreset's farthest-point rule, and training on real pill images through an ONNX graph
whose largest distance block is bounded by the chunk, not the bank."""
import numpy as np
import pytest
import torch

from conftest import read_json
from training.coreset import greedy_coreset
from training.patchcore import PatchCoreModel


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_nearest_distance_equals_brute_force(chunk):
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(100, 12, generator=gen) * 3
    patches = torch.cat([torch.randn(40, 12, generator=gen) * 3, bank[:5]])  # 5 exact hits
    model = PatchCoreModel(None, bank, (1, 1), chunk=chunk)
    with torch.no_grad():
        got = model.nearest_distance(patches)
    expected = torch.cdist(patches.double(), bank.double()).min(dim=1).values
    # float32 ||a||^2 - 2ab + ||b||^2 loses ~sqrt(eps) * ||a|| near zero (norms here ~10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-2)
    assert got[-5:].abs().max() < 1e-2  # a bank entry is at distance ~0 from itself, never NaN


def test_greedy_coreset_picks_the_farthest_point_each_step():
    rng = np.random.default_rng(1)
    points = torch.from_numpy(rng.normal(size=(300, 6)).astype(np.float32))
    chosen = greedy_coreset(points, 25, seed=2).tolist()
    assert len(set(chosen)) == 25
    d = torch.cdist(points.double(), points.double())
    for i in range(1, 25):
        nearest = d[:, chosen[:i]].min(dim=1).values  # distance to the selection so far
        assert nearest[chosen[i]] == pytest.approx(float(nearest.max()), rel=1e-5)


def test_greedy_coreset_picks_what_the_textbook_update_picks():
    """The in-place distance update picks exactly the indices of the plain expression it
    replaced (`x_sq - 2 * x @ c + c_sq`, which copied the features every step)."""
    from training.coreset import _greedy

    x = torch.from_numpy(np.random.default_rng(3).normal(size=(3000, 32)).astype(np.float32))
    x_sq = (x * x).sum(dim=1)
    fast = _greedy(x, x_sq, 200, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    plain = [int(torch.randint(len(x), (1,), generator=gen))]
    nearest = x_sq - 2 * x @ x[plain[0]] + x_sq[plain[0]]
    for _ in range(199):
        plain.append(int(torch.argmax(nearest)))
        nearest = torch.minimum(nearest, x_sq - 2 * x @ x[plain[-1]] + x_sq[plain[-1]])
    assert fast.tolist() == plain


def test_greedy_coreset_hand_case():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    chosen = greedy_coreset(points, 3, seed=0).tolist()
    # whatever the random start, the next pick is the farthest point from it, and so on
    far = {0: 3, 1: 3, 2: 3, 3: 0}
    assert chosen[1] == far[chosen[0]]
    assert set(chosen) == ({0, 3, 2} if chosen[0] != 1 else {1, 3, 0})
    with pytest.raises(ValueError, match="coreset"):
        greedy_coreset(points, 5)


def test_greedy_coreset_projects_wide_features():
    """300-dim features, distances taken in a 16-dim random projection: a rare far-away
    cluster (5 of 500 points) is still found, which a random subset would likely miss."""
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(500, 300, generator=gen)
    points[-5:] += 20.0
    chosen = greedy_coreset(points, 20, seed=0, projection_dims=16)
    assert len(set(chosen.tolist())) == 20
    assert (chosen >= 495).any()
    radius = torch.cdist(points, points[chosen]).min(dim=1).values.max()
    assert radius < torch.cdist(points[:5], points[-5:]).min()  # every point near a bank entry


@pytest.mark.pillqc
def test_patchcore_trains_on_real_images_and_exports(small_runs):
    from edge.bundle import load_bundle
    from edge.engine import open_engine
    from training.data import Split, load_images
    from training.train import load_run

    run = small_runs("patchcore")
    meta, metrics = read_json(run / "run.json"), read_json(run / "metrics.json")
    h, w = meta["map_size"]
    n_train = len(read_json(run / "split.json")["train"])
    assert meta["bank_size"] == round(0.25 * n_train * h * w)  # --coreset-ratio 0.25
    assert metrics["test"]["auroc"] >= 0.9
    model, _ = load_run(run)
    assert model.bank.shape == (meta["bank_size"], meta["feature_dims"])
    # the training images are covered by the bank: they score below the defects
    split = Split.from_json(read_json(run / "split.json"))
    size = tuple(meta["image_size"])
    with torch.no_grad():
        train_scores = model(torch.from_numpy(load_images(split.train, size).tensors))[0]
        defect_scores = model(torch.from_numpy(load_images(split.train_anomalous, size).tensors))[0]
    assert train_scores.max() < defect_scores.min()
    # ONNX Runtime: batch-independent (each image's map is its own), and equal to torch
    bundle = load_bundle(run / "bundle")
    test = load_images(split.test[:5], size).tensors
    engine = open_engine(bundle)
    scores5, maps5 = engine.infer(test)
    scores1 = np.concatenate([engine.infer(test[i:i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(scores5, scores1, rtol=1e-5)
    with torch.no_grad():
        torch_maps = model(torch.from_numpy(test))[1].numpy()
    np.testing.assert_allclose(maps5, torch_maps, rtol=1e-3, atol=1e-3)
    assert bundle.manifest["detector"] == "patchcore" and bundle.manifest["parity"]["decision_mismatches"] == 0


@pytest.mark.pillqc
def test_exported_graph_visits_the_bank_in_chunks(small_runs, tmp_path):
    """The distance MatMuls of the ONNX graph are (patches x chunk): the largest intermediate
    does not grow with the bank, and the chunked minimum equals the whole-bank one."""
    import onnx

    from edge.engine import OnnxRuntimeEngine
    from export.onnx_export import export_graph
    from training.data import Split, load_images
    from training.train import load_run

    run = small_runs("patchcore")
    model, meta = load_run(run)
    bank, chunk = meta["bank_size"], 50
    chunked = PatchCoreModel(model.backbone, model.bank, model.map_size, chunk=chunk,
                             projection=model.projection, offset=model.offset).eval()
    path = tmp_path / "chunked.onnx"
    export_graph(chunked, path, tuple(meta["image_size"]))
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    assert not any(node.op_type == "CDist" for node in graph.node)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    # the distance products (the projection's one MatMul reads the `projection` initializer)
    widths = [shapes[node.output[0]][-1] for node in graph.node
              if node.op_type == "MatMul" and not any("projection" in name for name in node.input)]
    assert sum(node.op_type == "MatMul" for node in graph.node) == len(widths) + 1
    assert len(widths) == -(-bank // chunk) and sum(widths) == bank and max(widths) == chunk
    split = Split.from_json(read_json(run / "split.json"))
    test = load_images(split.test[:3], tuple(meta["image_size"])).tensors
    _, maps = OnnxRuntimeEngine(path, "pixels", "score", "anomaly_map").infer(test)
    with torch.no_grad():
        whole = model(torch.from_numpy(test))[1].numpy()  # the run's own chunk (> bank here)
    np.testing.assert_allclose(maps, whole, rtol=1e-3, atol=1e-3)
