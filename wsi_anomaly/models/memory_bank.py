"""A memory bank of normal patch features: streaming coreset selection and exact nearest-neighbour
distance, in pure torch.

Interface (all tensors are ``torch.Tensor``; ``N`` patches, ``D`` feature dimensions):

- :class:`CoresetBuilder` ``(budget, projection_dim=128, seed=0, pool_factor=4)``:
  ``add(features)`` takes a float ``(N, D)`` chunk, any ``N >= 0``, on any device, and may be
  called any number of times; ``finish()`` returns the bank, ``(M, D)`` with ``M <= budget``
  (``M = min(budget, total patches added)``), in the dtype and on the device of the first chunk
  added, holding *original* (unprojected) feature rows. Read-only counters: ``total_seen``
  (rows added), ``filtered`` (rows dropped on arrival), ``reductions``, ``radius`` (covering
  radius of the last reduction, in the projection; ``None`` before the first), ``pooled`` and
  ``capacity`` (candidate rows held now / at most).
- :func:`greedy_k_center` ``(points (P, d), k, start=0)``: ``(min(k, P),)`` int64 indices in
  the order farthest-point selection picks them.
- :func:`nearest_distance` ``(queries (N, D), bank (M, D), chunk_rows=4096, chunk_bank=65536,
  return_index=False)``: the Euclidean distance from every query to its nearest bank row,
  ``(N,)`` float32 on the queries' device (plus the ``(N,)`` int64 index of that row when
  ``return_index``). Exhaustive: every bank row is compared with every query; the largest
  intermediate is ``chunk_rows × chunk_bank`` float32.
- :func:`covering_radius` ``(points, centres)``: ``max`` over points of their distance to the
  nearest centre (a float), the quantity greedy k-center minimises.
- :class:`BankModule`: an ``nn.Module`` holding a bank as its ``memory_bank`` buffer, fitted by
  streaming rows into a :class:`CoresetBuilder` (``begin_fit``, ``add_rows``, ``finish_fit``),
  restored with ``load_bank`` and searched with ``search``: what the memory-bank models share.

Selection, as PatchCore does it (Roth et al. 2022, "Towards total recall in industrial anomaly
detection"): features are mapped by a fixed random projection to ``projection_dim`` dimensions
(Johnson–Lindenstrauss; PatchCore uses scikit-learn's sparse random projection, we use a dense
Gaussian one, ``N(0, 1/projection_dim)`` entries, drawn from ``seed`` on the CPU so that the same
seed gives the same matrix on every device), and greedy k-center (farthest-point) selection runs
on the projected rows, starting from a row chosen by ``seed``; the rows selected are returned in
their original dimension. Greedy k-center is a 2-approximation of the optimal covering radius.

Streaming (merge and reduce, with an arrival filter): the builder keeps a pool of at most
``pool_factor × budget`` candidate rows. Whenever the pool is full, greedy k-center reduces it to
``budget`` rows, and the covering radius ``r`` of that reduction (the largest distance, in the
projection, from a pool row to the rows kept) is remembered. From then on a streamed row within
``r`` of a row kept at the last reduction is dropped on arrival (one matrix product against the
``budget`` kept rows: it is already covered as well as the rows the reduction dropped); only the
rows farther than ``r`` enter the pool, and ``finish`` reduces the last pool. Memory is therefore
bounded by the pool (``pool_factor × budget × (D + projection_dim)`` values plus one chunk)
whatever the number of patches streamed. The approximation: a row dropped (at arrival or at a
reduction) lies within that step's radius of a row kept, which may itself be dropped later, so
every streamed row lies within the *sum* of the radii of the steps it went through, not within
one greedy radius over all rows as a single pass over everything held in memory would give
(rows arriving late in regions never seen before are kept as candidates, never filtered). Costs:
each streamed row is projected (``D × projection_dim`` multiply-adds) and compared with the kept
rows (``budget × projection_dim``, as a matrix product); each reduction is
``O(pool_factor × budget² × projection_dim)``, sequential (matrix-vector) work, and happens
only when rows outside the covered region have filled the pool.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import nn

__all__ = [
    "BankModule",
    "CoresetBuilder",
    "covering_radius",
    "greedy_k_center",
    "nearest_distance",
]


def greedy_k_center(points: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices of ``k`` rows of ``points`` chosen by greedy farthest-point selection.

    Args:
        points: ``(P, d)`` float32 (the projected features).
        k: how many rows to select; all ``P`` rows (in order of selection) when ``k >= P``.
        start: the first row selected.

    Returns:
        ``(min(k, P),)`` int64 indices on ``points``' device, in the order they were selected.
    """
    return _greedy(points, k, start)[0]


def _greedy(points: torch.Tensor, k: int, start: int) -> tuple[torch.Tensor, float]:
    """:func:`greedy_k_center`'s indices and the covering radius they reach over ``points``."""
    n = points.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=points.device), float("inf")
    norms = (points * points).sum(dim=1)
    selected = torch.empty(k, dtype=torch.long, device=points.device)
    # squared distance of every row to its nearest selected row
    nearest = torch.full((n,), float("inf"), dtype=points.dtype, device=points.device)
    current = torch.tensor(start, dtype=torch.long, device=points.device)
    for i in range(k):
        selected[i] = current
        centre = points[current]
        # |x - c|² = |x|² - 2 x·c + |c|², one matrix-vector product per step
        dist = torch.addmv(norms + norms[current], points, centre, alpha=-2.0)
        torch.minimum(nearest, dist, out=nearest)
        current = torch.argmax(nearest)
    return selected, float(nearest[current].clamp_min(0.0).sqrt())


class CoresetBuilder:
    """Greedy k-center coreset of streamed patch features, with bounded memory (see the module
    docstring for the algorithm and its approximation).

    Args:
        budget: the largest number of rows the bank keeps (``M <= budget``), ``>= 1``.
        projection_dim: dimensions of the random projection the selection works in; when it is
            not smaller than ``D`` the features are used as they are.
        seed: seeds the projection matrix and the first row of every reduction; the same seed
            and the same chunks give the same bank.
        pool_factor: the pool holds at most ``pool_factor × budget`` candidate rows before it is
            reduced (``>= 2``): larger is closer to one greedy pass over everything, and cheaper
            per row, but holds more memory.
    """

    def __init__(
        self, budget: int, projection_dim: int = 128, seed: int = 0, pool_factor: int = 4
    ) -> None:
        if int(budget) < 1:
            raise ValueError(f"coreset budget must be >= 1, got {budget}")
        if int(projection_dim) < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
        if int(pool_factor) < 2:
            raise ValueError(f"pool_factor must be >= 2, got {pool_factor}")
        self.budget = int(budget)
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self.pool_factor = int(pool_factor)
        #: rows added so far, rows dropped on arrival as already covered, reductions run
        self.total_seen = 0
        self.filtered = 0
        self.reductions = 0
        #: covering radius (in the projection) of the last reduction; ``None`` before the first
        self.radius: float | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._dim: int | None = None
        self._projection: torch.Tensor | None = None
        self._features: torch.Tensor | None = None  # (capacity, D) pool, original rows
        self._projected: torch.Tensor | None = None  # (capacity, d) float32
        self._size = 0
        self._retained = 0  # rows at the pool's front kept by the last reduction

    @property
    def capacity(self) -> int:
        """Rows the pool holds before it is reduced."""
        return self.pool_factor * self.budget

    @property
    def pooled(self) -> int:
        """Candidate rows held now (``<= capacity``)."""
        return self._size

    def _allocate(self, features: torch.Tensor) -> None:
        dim = features.shape[1]
        self._dim = dim
        if self.projection_dim < dim:
            matrix = torch.randn(dim, self.projection_dim, generator=self._generator)
            self._projection = (matrix / self.projection_dim**0.5).to(features.device)
            proj_dim = self.projection_dim
        else:
            self._projection = None
            proj_dim = dim
        self._features = torch.empty(
            (self.capacity, dim), dtype=features.dtype, device=features.device
        )
        self._projected = torch.empty(
            (self.capacity, proj_dim), dtype=torch.float32, device=features.device
        )

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(torch.float32)
        return x if self._projection is None else x @ self._projection

    def add(self, features: torch.Tensor) -> None:
        """Stream ``(N, D)`` float features in (``N`` may be 0; ``D`` fixed by the first call).

        Raises:
            ValueError: not 2-D floating point, another ``D`` than before, or non-finite values.
        """
        if features.ndim != 2 or not features.is_floating_point():
            raise ValueError(
                f"coreset features must be a float (N, D) tensor, got {features.dtype} "
                f"of shape {tuple(features.shape)}"
            )
        if self._dim is None:
            if features.shape[1] < 1:
                raise ValueError("coreset features need at least one dimension")
            self._allocate(features)
        elif features.shape[1] != self._dim:
            raise ValueError(
                f"coreset features have {features.shape[1]} dimensions, earlier ones had {self._dim}"
            )
        if features.shape[0] == 0:
            return
        if not bool(torch.isfinite(features).all()):
            raise ValueError("coreset features hold NaN or infinite values")
        assert self._features is not None and self._projected is not None
        features = features.to(device=self._features.device, dtype=self._features.dtype)
        self.total_seen += features.shape[0]
        projected = self._project(features)
        if self.radius is not None and self._retained > 0:
            distance = nearest_distance(projected, self._projected[: self._retained])
            far = distance > self.radius
            self.filtered += int(far.numel() - int(far.sum()))
            features, projected = features[far], projected[far]
        offset = 0
        while offset < features.shape[0]:
            if self._size == self.capacity:
                self._reduce()
            take = min(self.capacity - self._size, features.shape[0] - offset)
            end = self._size + take
            self._features[self._size : end] = features[offset : offset + take]
            self._projected[self._size : end] = projected[offset : offset + take]
            self._size = end
            offset += take

    def _reduce(self) -> None:
        """Greedy k-center over the pool down to ``budget`` rows (kept at the pool's front)."""
        assert self._features is not None and self._projected is not None
        if self._size <= self.budget:
            return
        start = int(torch.randint(self._size, (1,), generator=self._generator))
        keep, radius = _greedy(self._projected[: self._size], self.budget, start=start)
        keep, _ = torch.sort(keep)  # keeps earlier rows first: the order streamed
        n = keep.shape[0]
        self._features[:n] = self._features[keep]
        self._projected[:n] = self._projected[keep]
        self._size = self._retained = n
        self.radius = radius
        self.reductions += 1

    def finish(self) -> torch.Tensor:
        """The bank: ``(M, D)`` original feature rows, ``M = min(budget, total_seen)``.

        The builder may go on streaming afterwards (``finish`` only reduces the pool).

        Raises:
            ValueError: nothing was added.
        """
        if self._features is None or self._size == 0:
            raise ValueError("the coreset is empty: no features were added")
        self._reduce()
        return self._features[: self._size].clone()


@overload
def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk_rows: int = ...,
    chunk_bank: int = ...,
    return_index: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk_rows: int = ...,
    chunk_bank: int = ...,
    *,
    return_index: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk_rows: int = 4096,
    chunk_bank: int = 65536,
    return_index: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean distance from each query row to its nearest bank row.

    Distances are searched by chunked matrix products (``|q|² - 2 q·b + |b|²`` in float32, on the
    queries' device; the bank is moved there once) and the distance to the row found is then
    recomputed directly as ``|q - b|``, so the value returned does not suffer the expansion's
    cancellation; only rows tied within float32 rounding can be exchanged.

    Args:
        queries: ``(N, D)`` float.
        bank: ``(M, D)`` float, ``M >= 1``.
        chunk_rows: queries per matrix product.
        chunk_bank: bank rows per matrix product.
        return_index: also return the index of the nearest bank row.

    Returns:
        ``(N,)`` float32 distances on ``queries.device``; with ``return_index``, also ``(N,)``
        int64 indices into ``bank``.

    Raises:
        ValueError: shapes that are not ``(N, D)`` and ``(M, D)`` with the same ``D``, an empty
            bank, or chunk sizes below 1.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"nearest_distance needs (N, D) queries and an (M, D) bank, got "
            f"{tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("nearest_distance needs a non-empty bank")
    if chunk_rows < 1 or chunk_bank < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_rows} and {chunk_bank}")
    device = queries.device
    bank32 = bank.to(device=device, dtype=torch.float32)
    bank_norms = (bank32 * bank32).sum(dim=1)
    n = queries.shape[0]
    distances = torch.empty(n, dtype=torch.float32, device=device)
    indices = torch.empty(n, dtype=torch.long, device=device)
    for q0 in range(0, n, chunk_rows):
        q = queries[q0 : q0 + chunk_rows].to(torch.float32)
        q_norms = (q * q).sum(dim=1, keepdim=True)
        best = torch.full((q.shape[0],), float("inf"), device=device)
        best_index = torch.zeros(q.shape[0], dtype=torch.long, device=device)
        for b0 in range(0, bank32.shape[0], chunk_bank):
            b = bank32[b0 : b0 + chunk_bank]
            d2 = torch.addmm(bank_norms[b0 : b0 + chunk_bank].unsqueeze(0), q, b.T, alpha=-2.0)
            d2 += q_norms
            value, index = d2.min(dim=1)
            better = value < best
            best = torch.where(better, value, best)
            best_index = torch.where(better, index + b0, best_index)
        distances[q0 : q0 + q.shape[0]] = (q - bank32[best_index]).norm(dim=1)
        indices[q0 : q0 + q.shape[0]] = best_index
    if return_index:
        return distances, indices
    return distances


def covering_radius(
    points: torch.Tensor, centres: torch.Tensor, chunk_rows: int = 4096, chunk_bank: int = 65536
) -> float:
    """The largest distance from a row of ``points`` ``(N, D)`` to its nearest row of ``centres``
    ``(M, D)``: how well the centres cover the points (0.0 for no points)."""
    if points.shape[0] == 0:
        return 0.0
    distances = nearest_distance(points, centres, chunk_rows=chunk_rows, chunk_bank=chunk_bank)
    return float(distances.max())


class BankModule(nn.Module):
    """A module whose state is a memory bank of normal rows (the ``memory_bank`` buffer).

    Args:
        coreset_budget, projection_dim, pool_factor, seed: the :class:`CoresetBuilder`'s settings.
        search_chunk: query rows per block of the exact nearest-neighbour search.
        what: what the rows are, for error messages ("patches", "tile vectors").
    """

    def __init__(
        self,
        coreset_budget: int,
        projection_dim: int = 128,
        pool_factor: int = 4,
        seed: int = 0,
        search_chunk: int = 4096,
        what: str = "rows",
    ) -> None:
        super().__init__()
        self.coreset_budget = int(coreset_budget)
        self.projection_dim = int(projection_dim)
        self.pool_factor = int(pool_factor)
        self.seed = int(seed)
        self.search_chunk = int(search_chunk)
        self._what = what
        self.register_buffer("memory_bank", torch.empty(0))
        self.memory_bank: torch.Tensor
        self._builder: CoresetBuilder | None = None

    def begin_fit(self) -> None:
        """Start a new bank (what :meth:`add_rows` streams into)."""
        self._builder = CoresetBuilder(
            self.coreset_budget, self.projection_dim, seed=self.seed, pool_factor=self.pool_factor
        )

    @torch.no_grad()
    def add_rows(self, rows: torch.Tensor) -> int:
        """Stream ``(N, D)`` normal rows into the bank builder; returns ``N``."""
        if self._builder is None:
            self.begin_fit()
        assert self._builder is not None
        self._builder.add(rows.float())
        return int(rows.shape[0])

    def finish_fit(self) -> None:
        """Select the coreset: the bank is ``(M, D)`` with ``M ≤ coreset_budget``."""
        if self._builder is None:
            raise ValueError(f"no normal {self._what} were seen: nothing to build a bank from")
        self.memory_bank = self._builder.finish().float().contiguous()
        self._builder = None

    def load_bank(self, bank: torch.Tensor) -> None:
        """Install a checkpoint's bank (``(M, D)`` float, ``M, D ≥ 1``)."""
        if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] < 1:
            raise ValueError(
                f"the memory bank must be a non-empty (M, D) matrix, got {tuple(bank.shape)}"
            )
        self.memory_bank = bank.float().contiguous()

    @property
    def feature_dim(self) -> int:
        """``D``, the width of the bank's rows (0 before the fit)."""
        return int(self.memory_bank.shape[1]) if self.memory_bank.ndim == 2 else 0

    @torch.no_grad()
    def search(self, queries: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 distance of every ``(N, D)`` query row to its nearest bank row."""
        if self.memory_bank.numel() == 0:
            raise ValueError("the memory bank is empty: fit the model first")
        bank = self.memory_bank.to(queries.device)
        return nearest_distance(queries.float(), bank, chunk_rows=self.search_chunk)
