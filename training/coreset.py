"""PatchCore's memory bank: greedy coreset subsampling of the normal patch features.

The greedy k-center selection (the paper's Algorithm 1) repeatedly adds the patch farthest from
everything selected so far, so the bank covers the feature space of the normal patches with a
fraction of them. Distances during the selection are taken after a seeded Gaussian random
projection to a few dimensions when the features are wider (Johnson-Lindenstrauss, as the
paper does).

Each pick reads every candidate once (one matrix-vector product), so the exact selection costs
picks x patches: fine for a hundred images (55k patches), hours for a thousand (784k patches,
78k picks). Two things keep a real training set's fit in minutes:

- The bank is capped (`DEFAULT_BANK_SIZE`): the search at inference costs patches x bank, and
  the cap keeps it below the backbone's own cost whatever the training set's size.
- Above `EXACT_LIMIT` patches the selection runs in two rounds (a composable coreset: Indyk et
  al. 2014, Malkomes et al. 2015): the patches are split at random into groups small enough to
  stay in the CPU's cache, each group's greedy coreset keeps OVERSAMPLE times its share of the
  bank, and the greedy selection over the union of those picks the bank. Every patch is within
  its group's covering radius of a candidate, so rare patches still reach the second round
  (a 4-approximation of the optimal radius, against the exact greedy's 2; in practice close
  to the exact one: tests/test_patchcore.py measures it).

fit_patchcore also fits the head's fixed projection (training/patchcore.py): the top principal
components of the normal patches, so the bank and the selection live in `projection_dims`.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from tqdm import tqdm

from .backbone import EfficientNetLite0
from .cpu import one_thread
from .padim import extract
from .patchcore import PatchCoreModel, local_patch_features, patch_dims

log = logging.getLogger(__name__)
DEFAULT_CORESET_RATIO = 0.1
# Bank cap and projected dims: the search's cost is map patches x bank x (dims + 1), and these
# keep it at most the backbone's on the project's 2-core CPU (benchmarks/results/patchcore_scale.md).
DEFAULT_BANK_SIZE = 4096
DEFAULT_PROJECTION_DIMS = 64
PROJECTION_DIMS = 128  # the selection's random projection, for features wider than this
EXACT_LIMIT = 65536  # patches up to which the selection is the exact greedy one (~83 images at 224)
GROUP_SIZE = 16384  # patches per first-round group: 16k x 64 float32 = 4 MB, about the CPU caches
OVERSAMPLE = 2  # first-round candidates per bank entry
PCA_SAMPLE = 200_000  # patches the principal components are estimated from (a seeded sample)


@torch.no_grad()
def greedy_coreset(features: torch.Tensor, count: int, seed: int = 0,
                   projection_dims: int = PROJECTION_DIMS, exact_limit: int = EXACT_LIMIT,
                   group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Indices (count,) of a greedy k-center coreset of features (N, D): the exact greedy
    selection up to `exact_limit` features, the two-round one above (module docstring)."""
    n, dims = features.shape
    if not 1 <= count <= n:
        raise ValueError(f"coreset of {count} from {n} features: need 1 <= count <= {n}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if dims > projection_dims:
        x = x @ (torch.randn(dims, projection_dims, generator=gen) / math.sqrt(projection_dims))
    x_sq = (x * x).sum(dim=1)
    with one_thread():  # each step is one matrix-vector product (training/cpu.py)
        if n <= exact_limit or OVERSAMPLE * count >= n // 2:
            with _progress(count) as bar:
                return _greedy(x, x_sq, count, gen, bar)
        return _two_rounds(x, x_sq, count, gen, group_size)


def _two_rounds(x: torch.Tensor, x_sq: torch.Tensor, count: int, gen: torch.Generator,
                group_size: int) -> torch.Tensor:
    n = len(x)
    groups = torch.randperm(n, generator=gen).split(group_size)
    shares = [min(len(g), math.ceil(OVERSAMPLE * count * len(g) / n)) for g in groups]
    candidates = []
    with _progress(sum(shares) + count) as bar:
        for g, share in zip(groups, shares):
            g = g.sort().values  # reading x in memory order
            candidates.append(g[_greedy(x[g], x_sq[g], share, gen, bar)])
        pool = torch.cat(candidates)
        return pool[_greedy(x[pool], x_sq[pool], count, gen, bar)]


def _progress(total: int) -> tqdm:
    return tqdm(total=total, desc="coreset", unit="pick", leave=False, mininterval=0.5)


def _greedy(x: torch.Tensor, x_sq: torch.Tensor, count: int, gen: torch.Generator,
            bar: tqdm | None = None) -> torch.Tensor:
    n = len(x)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    # squared distance of every feature to its nearest selected one
    nearest = _squared_distances(x, x_sq, int(chosen[0]))
    for i in range(1, count):
        chosen[i] = int(torch.argmax(nearest))
        torch.minimum(nearest, _squared_distances(x, x_sq, int(chosen[i])), out=nearest)
        if bar is not None and i % 256 == 0:
            bar.update(256)
    if bar is not None:
        bar.update((count - 1) % 256 + 1)
    return chosen


def _squared_distances(x: torch.Tensor, x_sq: torch.Tensor, j: int) -> torch.Tensor:
    """||x_i - x_j||^2 = ||x_i||^2 - 2 x_i.x_j + ||x_j||^2 for every i, one matrix-vector
    product and in-place updates of its (N,) result. Written as `x_sq - 2 * x @ x[j]`, Python
    scales all of x by 2 first: a copy of the (N, 128) features per pick, 7x the time of the
    product at 110k patches (54 vs 7 ms a pick). Doubling is exact in floating point, so the
    picks are the same."""
    d = torch.mv(x, x[j])
    return d.mul_(-2).add_(x_sq).add_(x_sq[j])


@torch.no_grad()
def principal_projection(patches: torch.Tensor, dims: int, seed: int = 0,
                         sample: int = PCA_SAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(projection (D, dims), offset (dims,)) mapping a patch x to (x - mean) @ V, V the top
    `dims` principal directions of the patches (estimated on a seeded sample of them). An
    orthonormal projection: distances in it are the distances within the principal subspace."""
    n, d = patches.shape
    if not 1 <= dims <= d:
        raise ValueError(f"--projection-dims {dims}: must be in 1..{d} (the patch features' dims)")
    if n > sample:
        patches = patches[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]]
    x = patches.double()
    mean = x.mean(dim=0)
    centred = x - mean
    evals, evecs = torch.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))
    top = evecs[:, torch.argsort(evals, descending=True)[:dims]]
    # eigenvectors are defined up to sign: fix it (largest entry positive) so refits agree
    top = top * torch.sign(top.gather(0, top.abs().argmax(dim=0, keepdim=True)))
    return top.float(), (-mean @ top).float()


def bank_size(patches: int, coreset_ratio: float, cap: int | None) -> int:
    """Entries the bank keeps: the ratio's share of the patches, at most `cap` (None: no cap)."""
    count = max(1, round(coreset_ratio * patches))
    return count if cap is None else min(count, cap)


@torch.no_grad()
def fit_patchcore(backbone: EfficientNetLite0, train_images: torch.Tensor, seed: int = 0,
                  coreset_ratio: float = DEFAULT_CORESET_RATIO, batch_size: int = 16,
                  max_bank: int | None = DEFAULT_BANK_SIZE,
                  projection_dims: int | None = DEFAULT_PROJECTION_DIMS) -> PatchCoreModel:
    """Memory bank from normal images (N, 3, H, W) pixels 0..255. `max_bank` caps the bank
    (None: the ratio alone), `projection_dims` sets the head's principal projection (None:
    the full features)."""
    if not 0 < coreset_ratio <= 1:
        raise ValueError(f"--coreset-ratio {coreset_ratio}: must be in (0, 1], e.g. 0.1")
    if max_bank is not None and (type(max_bank) is not int or max_bank < 1):
        raise ValueError(f"--bank-size {max_bank!r}: must be a whole number of at least 1, e.g. {DEFAULT_BANK_SIZE}")
    dims_in = patch_dims(backbone)
    if projection_dims is not None and (type(projection_dims) is not int or not 1 <= projection_dims <= dims_in):
        raise ValueError(f"--projection-dims {projection_dims!r}: must be a whole number in 1..{dims_in} (the "
                         f"backbone's patch features), e.g. {DEFAULT_PROJECTION_DIMS}; 0: no projection")
    if len(train_images) < 1:
        raise ValueError("PatchCore needs at least one normal training image")
    started = time.time()
    emb = extract(lambda x: local_patch_features(backbone, x), train_images, batch_size,
                  desc="PatchCore features")  # (N, D, h, w)
    seconds = {"features": time.time() - started}
    _, dims, h, w = emb.shape
    patches = emb.permute(0, 2, 3, 1).reshape(-1, dims)
    del emb
    projection = offset = None
    started = time.time()
    if projection_dims is not None and projection_dims < dims:
        projection, offset = principal_projection(patches, projection_dims, seed)
        patches = patches @ projection + offset
    seconds["projection"] = time.time() - started
    count = bank_size(len(patches), coreset_ratio, max_bank)
    started = time.time()
    bank = patches if count == len(patches) else patches[greedy_coreset(patches, count, seed)]
    seconds["coreset"] = time.time() - started
    log.info("PatchCore bank: %d of %d patches (%s dims) in %.1f s", count, len(patches),
             projection_dims if projection is not None else dims, seconds["coreset"])
    model = PatchCoreModel(backbone, bank.contiguous(), (h, w), projection=projection, offset=offset)
    model.fit_seconds = {k: round(v, 1) for k, v in seconds.items()}  # for benchmarks; not saved
    return model
