"""A point cloud prepared for intrinsic-dimension estimation: validated, de-duplicated, on the
device, with nearest-neighbour distances and the covariance spectrum computed once and shared
by every estimator and every sub-sample.

Why one shared object: the error bars of Ansuini et al. (NeurIPS 2019) re-estimate the dimension
on 20 random 90% sub-samples. Recomputing the ``n x n`` distances (``n x n x d`` flops; d is
12544 for the first Conv-4 block on 28x28 images) for each would dominate the cost. Instead the
``K`` nearest neighbours of every point are found once; a sub-sample's neighbours are the first
entries of each list that fall inside the sub-sample (exactly, not approximately: a row that runs
out of in-sample neighbours is searched again inside the sub-sample).

Distances: ``|a|^2 + |b|^2 - 2 a.b`` by chunks of rows (one matrix product each, on the device),
in float64 after centring the data. In float32 this form loses nearly coincident points (the
ones that decide TwoNN's ``mu = r2 / r1``: a 1e-3 gap at norm 1e3 is below its rounding); in
float64 the relative error is about ``1e-16 |a|^2 / r^2``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metarobust.errors import DataError
from metarobust.precision import LOW_PRECISION

# Bytes of scratch memory one chunk of distance rows may use.
_CHUNK_BYTES = 1 << 27


def as_points(X, name: str = "X", device: torch.device | str | None = None) -> torch.Tensor:
    """``X`` (numpy array or tensor, ``[n, d]``) as a floating tensor on ``device`` (default: where
    ``X`` is; numpy: CPU); raises :class:`DataError` naming the problem."""
    if isinstance(X, np.ndarray):
        if not np.issubdtype(X.dtype, np.number):
            raise DataError(f"{name} must hold numbers, got a numpy array of dtype {X.dtype}")
        X = torch.from_numpy(np.ascontiguousarray(X))
    elif not isinstance(X, torch.Tensor):
        raise DataError(f"{name} must be a numpy array or a torch tensor [n, d], got {type(X).__name__}")
    if X.dim() != 2:
        raise DataError(f"{name} must be 2-D [n_points, n_features], got shape {tuple(X.shape)}; "
                        f"flatten features first (x.flatten(1))")
    if X.is_complex() or X.dtype == torch.bool:
        raise DataError(f"{name} must be real numbers, got dtype {X.dtype}")
    if not X.is_floating_point() or X.dtype in LOW_PRECISION:
        X = X.float()  # integer pixels; half precision features (AMP) are promoted
    if device is not None:
        X = X.to(device)
    if not bool(torch.isfinite(X).all()):
        raise DataError(f"{name} contains NaN or infinite values ({int((~torch.isfinite(X)).sum())} "
                        f"entries); drop or fix those points first")
    return X


class PointCloud:
    """Points ``[n, d]`` with exact duplicates removed, ready for several estimators.

    Args:
        X: numpy array or tensor ``[n, d]`` (float; integers are converted).
        device: where the distances are computed (default: where ``X`` is).
        neighbours: length of the neighbour lists the first search computes (more than any
            estimator needs when sub-samples will follow, so one search serves them all).

    Attributes:
        points: ``float [m, d]`` distinct points (``m <= n``), in the input precision.
        n_input: ``n``; ``n_duplicates``: ``n - m`` rows dropped as exact copies of another row.
    Duplicates are removed because a zero nearest-neighbour distance makes TwoNN's ratio and
    every MLE term infinite; keeping one copy measures the set of distinct points.

    Example:
        >>> cloud = PointCloud(torch.randn(1000, 50))
        >>> cloud.knn(2).shape                       # r1, r2 of every point, float64
        torch.Size([1000, 2])
    """

    def __init__(self, X, device: torch.device | str | None = None, neighbours: int = 0) -> None:
        X = as_points(X, device=device)
        self.min_neighbours = neighbours
        self.n_input = X.shape[0]
        # The first copy of each row, in input order (torch.unique sorts rows; seeded
        # sub-samples should not depend on that sort).
        keep = _first_occurrences(X) if X.shape[0] > 1 else torch.arange(X.shape[0], device=X.device)
        self.n_duplicates = self.n_input - keep.numel()
        if self.n_duplicates:
            X = X[keep]
        self.points = X
        # Centred and float64: |a|^2 + |b|^2 - 2 a.b then keeps ~1e-16 * |a|^2 / r^2 relative
        # precision, enough for nearly coincident points (float32 loses them: tested), at
        # twice the cost of a float32 product and without gathering neighbour rows.
        self._centred = X.double() - X.double().mean(dim=0, keepdim=True)
        self._knn_dist: torch.Tensor | None = None  # float64 [m, K]
        self._knn_idx: torch.Tensor | None = None  # int64 [m, K]
        self._gram: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def device(self) -> torch.device:
        return self.points.device

    # -------------------------------------------------------------- nearest neighbours
    def knn(self, k: int, subset: torch.Tensor | None = None) -> torch.Tensor:
        """Distances from each point to its ``k`` nearest other points, ascending, float64.

        Args:
            k: neighbours per point (``k < len(subset)``).
            subset: ``int64 [s]`` indices of a sub-sample (distinct); neighbours are then
                searched inside the sub-sample only. ``None``: all points.
        Returns: ``float64 [s, k]`` (``[m, k]`` without ``subset``).
        """
        size = self.n if subset is None else int(subset.numel())
        if k >= size:
            raise DataError(f"need more points than neighbours: {size} distinct points for k={k} "
                            f"neighbours; give more points or a smaller k")
        share = 1.0 if subset is None else size / self.n
        # Neighbour lists long enough that a sub-sample of this share almost always finds k
        # of its own inside them; rows that do not are searched again below.
        wanted = min(self.n - 1, max(self.min_neighbours, math.ceil(k / share) + (0 if subset is None else 8)))
        if self._knn_dist is None or self._knn_dist.shape[1] < wanted:
            self._knn_dist, self._knn_idx = self._neighbours(self._rows(), None, wanted)
        if subset is None:
            return self._knn_dist[:, :k]
        subset = subset.to(self.device)
        inside = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        inside[subset] = True
        dist, idx = self._knn_dist[subset], self._knn_idx[subset]
        member = inside[idx]
        # Stable sort puts each row's in-subset neighbours first, still in ascending order.
        order = torch.sort((~member).to(torch.uint8), dim=1, stable=True).indices
        dist = torch.gather(dist, 1, order)[:, :k]
        short = member.sum(dim=1) < k
        if bool(short.any()):
            rows = subset[short]
            dist[short] = self._neighbours(rows, subset, k)[0]
        return dist

    def _rows(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device)

    def _neighbours(self, rows: torch.Tensor, among: torch.Tensor | None, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` nearest neighbours of ``points[rows]`` among ``points[among]`` (all: ``None``),
        excluding the point itself: (float64 distances, global indices), ascending."""
        cand = self._centred if among is None else self._centred[among]
        cand_sq = cand.pow(2).sum(dim=1)
        # own[i]: the column of point i among the candidates (-1: not a candidate)
        own = torch.arange(self.n, device=self.device)
        if among is not None:
            own = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
            own[among] = torch.arange(among.numel(), device=self.device)
        chunk = max(1, _CHUNK_BYTES // (8 * cand.shape[0]))  # [chunk, candidates] float64 rows
        dists, idxs = [], []
        for start in range(0, len(rows), chunk):
            r = rows[start : start + chunk]
            q = self._centred[r]
            sq = torch.addmm(q.pow(2).sum(dim=1, keepdim=True) + cand_sq, q, cand.T, alpha=-2)
            # Exclude the point itself by index (its computed distance need not be exactly 0).
            col = own[r].view(-1, 1)
            col_ok = col.clamp_min(0)
            sq.scatter_(1, col_ok, torch.where(col >= 0, float("inf"), sq.gather(1, col_ok)))
            top = torch.topk(sq, k, dim=1, largest=False)  # sorted ascending
            dists.append(top.values.clamp_min(0).sqrt())
            idxs.append(top.indices if among is None else among[top.indices])
        return torch.cat(dists), torch.cat(idxs)

    # -------------------------------------------------------------- covariance spectrum
    def spectrum(self, subset: torch.Tensor | None = None) -> torch.Tensor:
        """Eigenvalues of the sample covariance of the points (or of ``subset``), descending,
        float64 ``[min(s - 1, d)]`` (negative rounding noise clipped to 0).

        With more features than points the ``s x s`` Gram matrix of the centred points has the
        same non-zero eigenvalues and is smaller; it is computed once for all sub-samples
        (centring a sub-sample is ``J G J`` with ``J = I - 11^T / s``).
        """
        idx = self._rows() if subset is None else subset.to(self.device)
        s = idx.numel()
        if self.dim <= s:
            x = self.points[idx].double()
            x = x - x.mean(dim=0, keepdim=True)
            matrix = x.T @ x
        else:
            if self._gram is None:
                # In float64, like the distances (the same n x n x d product, already paid for
                # there). A float32 product may move each eigenvalue by up to d * 2^-24 of the
                # trace (variance shares off by up to ~2e-5 at d = 300); float64 by ~d * 1e-16.
                self._gram = self._centred @ self._centred.T
            g = self._gram[idx][:, idx]
            matrix = g - g.mean(dim=0, keepdim=True) - g.mean(dim=1, keepdim=True) + g.mean()
        eig = torch.linalg.eigvalsh(matrix / max(s - 1, 1)).flip(0).clamp_min(0)
        return eig[: min(s - 1, self.dim)]


def _first_occurrences(X: torch.Tensor) -> torch.Tensor:
    """Indices of the first copy of each distinct row of ``X``, in input order."""
    _, inverse = torch.unique(X, dim=0, return_inverse=True)
    n = X.shape[0]
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=X.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=X.device), reduce="amin")
    return torch.sort(first).values
