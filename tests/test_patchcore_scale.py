"""PatchCore at the size of a real training set: the two-round coreset's selection on known
points, the principal projection, the bank cap, and a projected model through ONNX Runtime."""
import numpy as np
import pytest
import torch

from training.backbone import load_backbone
from training.coreset import bank_size, fit_patchcore, greedy_coreset, principal_projection
from training.patchcore import PatchCoreModel


def _covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(dim=1).values.max())


def test_two_rounds_find_rare_far_patches():
    """30k patches from 20 overlapping Gaussian modes, plus 5 rare groups of 3 patches each far
    from them (a rare surface, seen in 3 images): the two-round selection (forced here by small
    limits) puts a bank entry in every rare group, as the exact greedy does; a random subset of
    the same size would hold none of them (15 of 30k patches)."""
    gen = torch.Generator().manual_seed(0)
    modes = torch.randn(20, 8, generator=gen) * 3
    bulk = modes[torch.randint(20, (30_000,), generator=gen)] + torch.randn(30_000, 8, generator=gen)
    rare_centres = torch.randn(5, 8, generator=gen)
    rare_centres = 30 * rare_centres / rare_centres.norm(dim=1, keepdim=True)
    rare = rare_centres.repeat_interleave(3, dim=0) + 0.05 * torch.randn(15, 8, generator=gen)
    points = torch.cat([bulk, rare])
    group = torch.cat([torch.full((30_000,), -1), torch.arange(5).repeat_interleave(3)])
    for chosen in (greedy_coreset(points, 200, seed=1, exact_limit=1000, group_size=2048),
                   greedy_coreset(points, 200, seed=1, exact_limit=len(points))):
        assert set(group[chosen].tolist()) >= {0, 1, 2, 3, 4}


def test_two_rounds_cover_nearly_as_tightly_as_the_exact_greedy():
    """On a Gaussian mixture the two-round selection's covering radius (the farthest any point
    is from the bank: what a normal patch scores at worst) stays within 1.5x of the exact one's
    (1.35x here), far below a random subset's. Three dims: in many, 500 entries cannot cover
    Gaussian tails at all and every selection's radius is alike."""
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(30, 3, generator=gen) * 4
    points = centres[torch.randint(30, (40_000,), generator=gen)] + torch.randn(40_000, 3, generator=gen)
    exact = _covering_radius(points, greedy_coreset(points, 500, seed=0, exact_limit=len(points)))
    two = _covering_radius(points, greedy_coreset(points, 500, seed=0, exact_limit=1000, group_size=4096))
    random = _covering_radius(points, torch.randperm(len(points), generator=gen)[:500])
    assert exact <= two <= 1.5 * exact
    assert two < 0.7 * random


def test_two_rounds_pick_distinct_indices_deterministically():
    points = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(5))
    a = greedy_coreset(points, 300, seed=7, exact_limit=1000, group_size=3000)
    b = greedy_coreset(points, 300, seed=7, exact_limit=1000, group_size=3000)
    assert len(set(a.tolist())) == 300 and 0 <= int(a.min()) and int(a.max()) < len(points)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy_coreset(points, 300, seed=8, exact_limit=1000, group_size=3000))


def test_principal_projection_keeps_the_subspace_the_data_lives_in():
    """Points on a 3-dim subspace of a 20-dim space (plus a fixed offset): projected to 3 dims,
    every pairwise distance is kept; the projection is orthonormal and centres the data."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 3, generator=gen)).Q  # (20, 3) orthonormal
    scales = torch.tensor([5.0, 2.0, 1.0])
    x = (torch.randn(2000, 3, generator=gen) * scales) @ basis.T + 7.0
    projection, offset = principal_projection(x, 3)
    y = x @ projection + offset
    torch.testing.assert_close(projection.T @ projection, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.mean(dim=0), torch.zeros(3), atol=1e-3, rtol=0)
    exact = "donot_use_mm_for_euclid_dist"  # cdist by subtraction: no rounding near 0
    torch.testing.assert_close(torch.cdist(y[:200], y[:200], compute_mode=exact),
                               torch.cdist(x[:200], x[:200], compute_mode=exact), atol=2e-3, rtol=1e-4)
    variances = y.var(dim=0)
    assert variances[0] > variances[1] > variances[2]  # largest component first
    with pytest.raises(ValueError, match="projection-dims 21"):
        principal_projection(x, 21)


def test_bank_size_is_the_ratio_up_to_the_cap():
    assert bank_size(54_880, 0.1, 4096) == 4096  # 70 images at 224: capped
    assert bank_size(10_000, 0.1, 4096) == 1000  # small sets keep the ratio
    assert bank_size(784_000, 0.1, None) == 78_400  # no cap
    assert bank_size(3, 0.1, 4096) == 1


def test_fit_caps_the_bank_and_projects_and_the_graph_matches_torch(tmp_path):
    """Real backbone features of 6 synthetic images (64 x 64: 8 x 8 patches each): the bank
    stops at the cap, lives in the projected dims, and the exported graph (projection inside)
    gives torch's maps; distances equal a brute-force search of the projected bank."""
    from edge.engine import OnnxRuntimeEngine
    from export.onnx_export import export_graph

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0, 255, size=(6, 3, 64, 64)).astype(np.float32))
    backbone = load_backbone("imagenet", image_size=64)
    model = fit_patchcore(backbone, images, seed=0, coreset_ratio=0.5, max_bank=100, projection_dims=16).eval()
    dims = 40 + 80 + 112  # Lite0's stride-8 stage and its two stride-16 stages
    assert model.bank.shape == (100, 16) and model.projection.shape == (dims, 16)
    full = fit_patchcore(backbone, images, seed=0, coreset_ratio=0.5, max_bank=None, projection_dims=None)
    assert full.bank.shape == (6 * 8 * 8 // 2, dims) and full.projection is None
    test = torch.from_numpy(rng.uniform(0, 255, size=(3, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        scores, maps = model(test)
        patches = model.embed(test).permute(0, 2, 3, 1).reshape(-1, dims)
        brute = torch.cdist(model.project(patches).double(), model.bank.double()).min(dim=1).values
    torch.testing.assert_close(maps.reshape(-1).double(), brute, rtol=1e-3, atol=1e-3)
    path = tmp_path / "projected.onnx"
    export_graph(model, path, (64, 64))
    onnx_scores, onnx_maps = OnnxRuntimeEngine(path, "pixels", "score", "anomaly_map").infer(test.numpy())
    np.testing.assert_allclose(onnx_maps, maps.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), rtol=1e-4)


@pytest.mark.parametrize("bad,match", [({"max_bank": 0}, "bank-size 0"), ({"projection_dims": -1}, "projection-dims -1"),
                                       ({"projection_dims": 500}, "projection-dims 500")])
def test_bad_bank_or_projection_options_are_named(bad, match):
    images = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match=match):
        fit_patchcore(load_backbone(None, image_size=64), images, **bad)


def test_projected_model_round_trips_through_run_json_shape():
    """build_model(run.json) makes an empty module load_state_dict(model.pt) fills exactly:
    a projected bank and an old run's raw one, of today's patch stages and of those of runs
    saved before run.json named them (no "patch_stages": the stride-8 and last stride-16 stage)."""
    from training.detectors import get_detector
    from training.patchcore import PATCH_STAGES, PATCH_STAGES_BEFORE, patch_dims

    detector = get_detector("patchcore")
    backbone = load_backbone(None, image_size=64)
    gen = torch.Generator().manual_seed(0)
    for stages, projected in [(PATCH_STAGES, True), (PATCH_STAGES, False), (PATCH_STAGES_BEFORE, True),
                              (PATCH_STAGES_BEFORE, False)]:
        dims = patch_dims(backbone, stages)
        assert dims == (232 if stages == PATCH_STAGES else 152)
        projection = torch.randn(dims, 8, generator=gen) if projected else None
        k = 8 if projected else dims
        model = PatchCoreModel(backbone, torch.randn(30, k, generator=gen), (8, 8), chunk=16, projection=projection,
                               offset=torch.randn(8, generator=gen) if projected else None, stages=stages)
        meta = detector.shape(model)
        assert meta["patch_dims"] == (dims if projected else None) and meta["patch_stages"] == list(stages)
        if stages == PATCH_STAGES_BEFORE:
            del meta["patch_stages"]  # as such a run's run.json has it
        rebuilt = detector.build(meta, load_backbone(None, image_size=64))
        assert rebuilt.stages == stages
        rebuilt.load_state_dict(model.state_dict())
        x = torch.rand(2, 3, 64, 64) * 255
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x)[1], model(x)[1])


@pytest.mark.pillqc
def test_backbone_choice_is_recorded_in_run_json_and_manifest(pillqc_small, tmp_path):
    """`linegate train --backbone lite1` end to end on real pill images: run.json and the bundle
    manifest name the backbone, load_run rebuilds Lite1 (21 blocks) and the bundle's parity
    check passed; the PatchCore options are recorded too."""
    from conftest import SMALL_IMAGE_SIZE, read_json, small_split
    from edge.bundle import load_bundle
    from export.onnx_export import export_onnx
    from training.train import load_run, train

    run = tmp_path / "lite1"
    train(pillqc_small, run, "normal", "patchcore", seed=0, image_size=SMALL_IMAGE_SIZE, counts=small_split(),
          backbone="lite1", bank_size=50, projection_dims=16, report=False)
    meta = read_json(run / "run.json")
    assert meta["backbone"] == "lite1"
    assert (meta["bank_size"], meta["feature_dims"], meta["patch_dims"]) == (50, 16, 232)
    assert meta["patch_stages"] == ["stride8", "stride16a", "stride16"]
    assert meta["options"]["bank_size"] == 50 and meta["options"]["projection_dims"] == 16
    model, _ = load_run(run)
    assert model.backbone.variant == "lite1" and len(model.backbone._blocks) == 21
    manifest = load_bundle(export_onnx(run)).manifest
    assert manifest["backbone"]["name"] == "efficientnet-lite1"
    assert manifest["parity"]["decision_mismatches"] == 0


@pytest.mark.parametrize("stages", [["stride16", "stride8"], ["stride8"], ["stride8", "stride4"], "stride8,stride16",
                                    ["stride8", "layer3"], ["stride8", "stride16", "stride16"]])
def test_a_bad_patch_stages_in_run_json_is_named(stages):
    from training.detectors import get_detector

    meta = {"bank_size": 4, "feature_dims": 8, "map_size": [8, 8], "chunk": 16, "patch_dims": 232,
            "patch_stages": stages}
    with pytest.raises(ValueError, match="run.json: 'patch_stages' must be \"stride8\" then distinct stride-16 stages"):
        get_detector("patchcore").build(meta, load_backbone(None, image_size=64))
