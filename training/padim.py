"""PaDiM (Defard et al. 2020), as in the seed "Detect Image Anomalies Using Pretrained
ResNet-18 Feature Embeddings", on EfficientNet-Lite0.

Multi-scale features of a frozen backbone are concatenated at the stride-4 resolution, a
seeded random d of the 176 channels are kept (the paper's d = 100, training's default; run.json
records the chosen channels), and each spatial patch gets a Gaussian: mean and Ledoit-Wolf
covariance (the seed's is covariance + 0.01 I; see patch_covariances for why not). The anomaly
map is the Mahalanobis distance per patch; the image score is the mean of the map at feature
resolution (the runtime upsamples only for overlays).

Locally aware features (training's default, `neighbourhood` 3): each tap is first averaged
over the 3x3 neighbourhood of every feature at its own resolution, as PatchCore does (Roth et
al. 2022, section 3.1, whose argument is a larger receptive field at the same resolution and
robustness to small spatial deviations): a patch's Gaussian then describes its surroundings
too. neighbourhood 1 is the paper's PaDiM (and what runs saved without the key hold). Chosen
on calibration figures, not on that argument: benchmarks/results/README.md.

`PaDiMModel` is a plain nn.Module with no training state, so it exports to ONNX as is.
`embed()` is the textbook feature extraction (upsample, concatenate, select) used to fit;
`forward()` computes the same distances in a form that costs little next to the backbone
(issue 6; measured with `linegate bench`):

- Whitening instead of an inverse: with the Cholesky factor L of the patch covariance,
  d = ||L^-1 (x - mu)||, and the mean is folded in as a bias column (x' = [1, x]), so the
  head is matrix products only.
- The channels are ordered coarse tap first (stride 16, 8, 4). L^-1 is lower triangular, so
  whitened outputs of a coarse tap depend on coarse inputs only: the blocks above the
  diagonal are zero and are neither stored nor multiplied (6,464 instead of 10,100 weights
  per patch for 100 channels; the head streams its weights once per batch, so bytes are time).
- No upsampling, concatenation or channel-gather of the full 56x56x176 tensor: each tap's
  selected channels are gathered once at their own resolution, and the nearest-neighbour
  upsample becomes sharing: the 4x4 patches that see one stride-16 feature vector are one
  GEMM with their weights stacked (a taller matrix reads the input once).
- The batch is the GEMM's inner (N) dimension: each tap is transposed as one 2-D matrix
  (B, C*h*w) -> (C*h*w, B) and the per-patch weights are the left operand, the layout ONNX
  Runtime's MatMul runs best (the weights are streamed, never repacked per call).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .backbone import TAP_BLOCKS, TAP_CHANNELS, EfficientNetLite0

COV_EPS = 0.01  # the seed's regulariser: covariance + 0.01 I
COVARIANCE = "ledoit-wolf"  # how fit_padim estimates a patch's covariance (benchmarks record it)
DEFAULT_DIMS = 100
DEFAULT_NEIGHBOURHOOD = 3  # locally aware features; 1 = the paper's
TAPS = tuple(TAP_BLOCKS)  # order of backbone.features(): stride4, stride8, stride16
# Output groups per tap in the head, coarse tap first. More groups skip more of the zero
# triangle but add GEMM calls; on ORT CPU (2 cores) splitting the stride-16 tap in two saves
# 12% of the weight bytes at no measurable cost, finer splits gain nothing more.
HEAD_GROUPS = (2, 1, 1)


@dataclass(frozen=True)
class _Level:
    """One tap in the head (coarse first): which channels, and how its patches share input."""
    tap: int  # index into backbone.features()
    start: int  # first head-order channel of this tap
    stop: int
    share: int  # consecutive patches (head patch order) that read the same feature vector
    blocks: int  # = patches / share


@dataclass(frozen=True)
class _Term:
    group: int
    level: int
    rows: int  # input rows of that level's matrix (bias row included for level 0)
    name: str  # buffer with the weights: (blocks, share * group outputs, rows)


def _tap_sizes(backbone: EfficientNetLite0) -> list[tuple[int, int]]:
    h, w = getattr(backbone, "input_hw", (backbone.image_size,) * 2)
    taps = list(backbone.tap_blocks.values())  # stride 4, 8, 16
    stride = h // backbone._blocks[taps[0]].out_size  # 4: "same" convs give ceil(size / stride)
    return [(-(-h // (stride * 2 ** k)), -(-w // (stride * 2 ** k))) for k in range(len(taps))]


def _nearest_source(size: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """For each patch of the (out) map, row-major, the row-major pixel of a (size) tap that
    F.interpolate(mode="nearest") copies there: the same rule `embed()` uses."""
    grid = torch.arange(size[0] * size[1], dtype=torch.float64).reshape(1, 1, *size)
    return F.interpolate(grid, size=out, mode="nearest").reshape(-1).long()


class PaDiMModel(nn.Module):
    def __init__(self, backbone: EfficientNetLite0, channels: torch.Tensor, groups: tuple[int, ...] = HEAD_GROUPS,
                 neighbourhood: int = 1):
        """An empty model (zero weights) for `channels` (sorted indices into the concatenated
        taps), whose taps are averaged over `neighbourhood` x `neighbourhood` features (odd;
        1: not at all); fit_padim fills it, or load_state_dict does."""
        super().__init__()
        check_neighbourhood(neighbourhood)
        self.neighbourhood = int(neighbourhood)
        # saved in model.pt too, so a run.json that lost or changed the key is refused on load
        self.register_buffer("neighbourhood_size", torch.tensor(self.neighbourhood))
        self.backbone = backbone
        sizes = _tap_sizes(backbone)
        self.map_size = sizes[0]
        h, w = self.map_size
        self.register_buffer("channels", channels.long())  # (D,) indices into the concatenation
        bounds = torch.tensor([0, *itertools.accumulate(backbone.tap_channels.values())])
        tap_of = torch.bucketize(self.channels, bounds[1:], right=True)  # (D,) which tap
        # Head order: coarse tap first; `order` maps head position -> position in `channels`.
        taps = list(reversed(range(len(TAPS))))  # stride16, stride8, stride4
        order = torch.cat([torch.nonzero(tap_of == t).flatten() for t in taps])
        self.register_buffer("order", order, persistent=False)

        # Patch order of the head: nested blocks, so that every tap's shared patches are a
        # contiguous run. Falls back to row-major without sharing when sizes don't nest.
        factors = [(h // s[0], w // s[1]) for s in (sizes[t] for t in taps)]
        nested = all(h == f[0] * sizes[t][0] and w == f[1] * sizes[t][1] for f, t in zip(factors, taps)) and \
            all(a[0] % b[0] == 0 and a[1] % b[1] == 0 for a, b in zip(factors, factors[1:]))
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        if nested:
            key = torch.zeros(h * w, dtype=torch.long)
            prev = (h, w)
            for f in factors:  # coarse to fine: block index within the previous block
                key = key * (prev[0] // f[0]) * (prev[1] // f[1]) + ((rows % prev[0]) // f[0]) * (prev[1] // f[1]) \
                    + (cols % prev[1]) // f[1]
                prev = f
            patch_order = torch.argsort(key)
        else:
            patch_order = torch.arange(h * w)
        self.register_buffer("patch_order", patch_order, persistent=False)  # head patch -> row-major
        self.register_buffer("unorder", torch.argsort(patch_order), persistent=False)

        levels, start = [], 0
        for lvl, t in enumerate(taps):
            n = int((tap_of == t).sum())
            share = factors[lvl][0] * factors[lvl][1] if nested else 1
            levels.append(_Level(t, start, start + n, share, h * w // share))
            src = _nearest_source(sizes[t], (h, w))[patch_order][::share]  # (blocks,) tap pixel
            within = self.channels[order[start:start + n]] - bounds[t]  # channel within the tap
            index = within[None, :] * (sizes[t][0] * sizes[t][1]) + src[:, None]
            self.register_buffer(f"gather{lvl}", index.flatten(), persistent=False)
            start += n
        self.levels = levels

        # Output groups (head order) and the weights each needs: group g of level L reads all
        # of the coarser levels and the prefix of level L up to its own end (triangularity).
        self.groups, self.terms = [], []
        for lvl, (level, k) in enumerate(zip(levels, groups)):
            n = level.stop - level.start
            cuts = [level.start + round(n * i / k) for i in range(k + 1)]
            self.groups += [(lvl, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        for g, (lvl_g, _, stop) in enumerate(self.groups):
            m = stop - self.groups[g][1]
            for lvl in range(lvl_g + 1):
                level = levels[lvl]
                k = (level.stop if lvl < lvl_g else stop) - level.start + (lvl == 0)
                if k == 0:  # a tap none of whose channels were selected
                    continue
                name = f"weight_g{g}_l{lvl}"
                self.register_buffer(name, torch.zeros(level.blocks, level.share * m, k))
                self.terms.append(_Term(g, lvl, k, name))

    def taps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's taps, each at its own resolution, averaged over the neighbourhood."""
        taps = self.backbone.features(pixels)
        if self.neighbourhood == 1:
            return taps
        n = self.neighbourhood
        # zero padding counted in the mean, as PatchCore's: a border patch sees the same zeros
        # when fitted and when scored
        return [F.avg_pool2d(t, n, stride=1, padding=n // 2) for t in taps]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels 0..255 -> (B, D, h, w) selected multi-scale features."""
        taps = self.taps(pixels)
        taps = [t if t.shape[-2:] == self.map_size else F.interpolate(t, size=self.map_size, mode="nearest")
                for t in taps]
        return torch.index_select(torch.cat(taps, dim=1), 1, self.channels)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (score (B,), anomaly_map (B, h, w)); score = mean of the map."""
        taps = self.taps(pixels)
        b = pixels.shape[0]
        xs = []
        for lvl, level in enumerate(self.levels):
            flat = taps[level.tap].reshape(b, -1).t()  # (C*h*w, B): the batch is the GEMM's N
            x = torch.index_select(flat, 0, getattr(self, f"gather{lvl}"))
            x = x.reshape(level.blocks, level.stop - level.start, b)
            if lvl == 0:  # the bias row: z = L^-1 [-mu | I] [1; x]
                x = torch.cat([x.new_ones(level.blocks, 1, b), x], dim=1)
            xs.append(x)
        patches = self.map_size[0] * self.map_size[1]
        zs: dict[int, torch.Tensor] = {}
        for term in self.terms:
            x = xs[term.level]
            if term.rows < x.shape[1]:
                x = x[:, :term.rows]
            z = torch.matmul(getattr(self, term.name), x).reshape(patches, -1, b)  # (P, m, B)
            zs[term.group] = z if term.group not in zs else zs[term.group] + z
        # A ReduceL2 per group, joined as sqrt(sum of squares) on the small (P, B) norms: not a
        # Concat of the groups' (P, m, B) outputs into one (0.8-1 ms of a 56 ms call at batch 8,
        # ONNX Runtime on 2 cores), nor a Mul + ReduceSum per group (ONNX Runtime reduces a
        # middle axis slowly, and per call: 1.4 of 10.7 ms at batch 1).
        norms = [torch.linalg.vector_norm(zs[g], dim=1) for g in sorted(zs)]  # (P, B) each, head order
        squared = norms[0] * norms[0]
        for norm in norms[1:]:
            squared = squared + norm * norm
        dist = torch.index_select(torch.sqrt(squared), 0, self.unorder)  # row-major
        anomaly_map = dist.t().reshape(b, *self.map_size)
        return anomaly_map.mean(dim=(1, 2)), anomaly_map

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The head's index buffers (order, gather*) are built from `channels` in __init__ and
        # are not saved: loading other channels over them would score with the wrong weights.
        saved = state_dict.get(prefix + "channels")
        if saved is not None and not torch.equal(saved.long().cpu(), self.channels.cpu()):
            raise ValueError(
                f"model.pt: its PaDiM channels ({saved.numel()}: {saved.tolist()[:6]}...) differ from the "
                f"ones run.json gives ({self.channels.numel()}: {self.channels.tolist()[:6]}...), e.g. a run "
                "without run.json 'channels' whose seeded choice this PyTorch version draws differently; "
                "add model.pt's channel list to run.json as \"channels\", or re-train the run")
        key = prefix + "neighbourhood_size"
        fitted = int(state_dict[key]) if key in state_dict else 1  # saved before the option: raw features
        if fitted != self.neighbourhood:
            raise ValueError(f"model.pt was fitted with PaDiM neighbourhood {fitted}, run.json gives "
                             f"{self.neighbourhood}: set run.json \"neighbourhood\" to {fitted}, the value the run "
                             "was trained with")
        state_dict[key] = self.neighbourhood_size.clone()
        # Runs saved before the blocked head hold `mean` (P, D) and `whiten` (P, D, D) = C^-T
        # in `channels` order: the covariance is (whiten whiten^T)^-1, so they still load.
        mean, whiten = state_dict.pop(prefix + "mean", None), state_dict.pop(prefix + "whiten", None)
        if mean is not None and whiten is not None:
            with torch.no_grad():
                w = whiten.double()
                self.set_gaussians(mean.double(), torch.linalg.inv(w @ w.transpose(1, 2)))
            state_dict.update({prefix + t.name: getattr(self, t.name).clone() for t in self.terms})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_gaussians(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Fill the head from per-patch Gaussians in `channels` order: mean (P, D), cov (P, D, D)
        (row-major patches; float64 recommended)."""
        o = self.order
        mean, cov = mean[:, o].double(), cov[:, o][:, :, o].double()
        chol = torch.linalg.cholesky(cov)  # cov = L L^T, L lower triangular
        eye = torch.eye(mean.shape[1], dtype=torch.float64).expand_as(cov)
        aug = torch.linalg.solve_triangular(chol, torch.cat([-mean.unsqueeze(-1), eye], 2), upper=False)
        aug = aug[self.patch_order]  # (P, D, 1 + D) = L^-1 [-mu | I], head patch order
        for term in self.terms:
            _, a, b = self.groups[term.group]
            level = self.levels[term.level]
            first = level.start + 1 if term.level else 0  # column 0 is the bias
            block = aug[:, a:b, first:first + term.rows]  # (P, m, rows)
            weight = block.reshape(level.blocks, level.share * (b - a), term.rows)
            getattr(self, term.name).copy_(weight.float())


def check_neighbourhood(n: object, name: str = "PaDiM neighbourhood",
                        hint: str = "3: locally aware features, the default; 1: the paper's raw features") -> None:
    """`name` says where the value came from (an option, a run.json key), `hint` what to do."""
    if type(n) is not int or n < 1 or n % 2 == 0:  # an even window would shift the map by half a patch
        raise ValueError(f"{name} {n!r}: must be an odd integer >= 1 ({hint})")


def select_channels(seed: int, dims: int = DEFAULT_DIMS, total: int = sum(TAP_CHANNELS.values())) -> torch.Tensor:
    """A seeded random `dims` of the `total` tapped channels (Lite0's 176 unless told)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:dims].sort().values


@torch.no_grad()
def extract(model_embed, images: torch.Tensor, batch_size: int = 16, desc: str = "features") -> torch.Tensor:
    """Run `model_embed` over images in batches with a progress bar; concatenates the outputs."""
    if not len(images):  # torch.cat of nothing says only "expected a non-empty list"
        raise ValueError(f"{desc}: no images to process")
    outs = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        outs.append(model_embed(images[i:i + batch_size]))
    return torch.cat(outs)


@torch.no_grad()
def fit_padim(backbone: EfficientNetLite0, train_images: torch.Tensor, seed: int = 0,
              dims: int = DEFAULT_DIMS, batch_size: int = 16,
              neighbourhood: int = DEFAULT_NEIGHBOURHOOD) -> PaDiMModel:
    """Fit the per-patch Gaussians on normal images (N, 3, H, W) pixels 0..255."""
    if len(train_images) < 2:
        raise ValueError("PaDiM needs at least 2 normal training images")
    total = sum(backbone.tap_channels.values())
    if not 1 <= dims <= total:
        raise ValueError(f"--dims {dims}: must be in 1..{total} (EfficientNet-{backbone.variant.title()}'s "
                         "tapped channels)")
    model = PaDiMModel(backbone, select_channels(seed, dims, total), neighbourhood=neighbourhood)
    emb = extract(model.embed, train_images, batch_size, desc="PaDiM features")  # (N, D, h, w)
    n = emb.shape[0]
    x = emb.reshape(n, dims, -1).permute(2, 0, 1).double()  # (P, N, D)
    model.set_gaussians(x.mean(dim=1), patch_covariances(x))
    return model


def patch_covariances(x: torch.Tensor) -> torch.Tensor:
    """(P, N, D) features of N training images at P patches -> (P, D, D) covariances,
    each Ledoit-Wolf's (scikit-learn): the sample covariance shrunk toward a scaled identity
    by the amount that minimises the expected error, which the data themselves estimate.

    The seed adds a fixed 0.01 I instead. With 70 images and d = 100 a patch's sample
    covariance is singular and that constant sets the distance along the missing directions;
    Ledoit-Wolf scales the shrinkage to the data, so d can stay at the paper's 100. A patch
    whose features never vary (a covariance still singular) gets the seed's 0.01 I on top."""
    from sklearn.covariance import ledoit_wolf

    xs = x.numpy()
    cov = torch.from_numpy(np.stack([
        ledoit_wolf(xs[p])[0] for p in tqdm(range(len(xs)), desc="PaDiM covariances", unit="patch",
                                              leave=False, mininterval=0.5)]))
    singular = torch.linalg.cholesky_ex(cov).info > 0
    cov[singular] += COV_EPS * torch.eye(cov.shape[-1], dtype=cov.dtype)
    return cov
