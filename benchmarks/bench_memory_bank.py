"""Memory and speed of the streaming memory bank: coreset of 20 000 tiles' patch features.

Streams synthetic patch features of a real backbone's dimensions (by default wide_resnet50_2
layers 2+3: a 28×28 grid × 1536 channels per 224 px tile; ``--preset vit-l``: 16×16 × 1024) into
:class:`wsi_anomaly.models.memory_bank.CoresetBuilder`, chunk by chunk (never holding them all),
then searches the bank with :func:`~wsi_anomaly.models.memory_bank.nearest_distance` for the
patches of fresh tiles. Reports wall time (the builder's own time apart from generating the
synthetic features), peak RSS of the process, bank size, rows filtered on arrival, reductions
and the search throughput.

The synthetic features are post-ReLU random features of a low-dimensional latent (``--latent``
dimensions, ``--tissue-types`` clusters of tiles, every patch its tile's type plus Gaussian
noise): they have the real shapes and a structure to cover, but how much of the stream the
arrival filter drops depends on the data, so real features may cost more reductions.

Prints a Markdown table; ``--json`` also writes the numbers. Example::

    python benchmarks/bench_memory_bank.py --tiles 20000 --budget 4096 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

from wsi_anomaly.models.memory_bank import CoresetBuilder, covering_radius, nearest_distance

PRESETS = {
    # wide_resnet50_2 layers 2 (512 ch) + 3 (1024 ch) on layer 2's 28×28 grid for 224 px tiles
    "wrn50-l23": (28, 1536),
    # a ViT-L/16 (UNI, Phikon-v2) at 224 px: 16×16 patch tokens × 1024
    "vit-l": (16, 1024),
}


class SyntheticFeatures:
    """Patch features of ``tiles`` tiles, generated ``chunk`` tiles at a time, reproducibly."""

    def __init__(self, grid: int, dim: int, latent: int, tissue_types: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.grid, self.dim, self.latent = grid, dim, latent
        self.types = 3.0 * torch.randn(tissue_types, latent, generator=g)
        self.weight = torch.randn(latent, dim, generator=g) / latent**0.5
        self.bias = 0.1 * torch.randn(dim, generator=g)
        self.generator = g

    def tiles(self, n: int) -> torch.Tensor:
        """``(n × grid², dim)`` float32 patch features of ``n`` new tiles."""
        g = self.generator
        patches = self.grid * self.grid
        kind = torch.randint(self.types.shape[0], (n,), generator=g)
        z = self.types[kind].repeat_interleave(patches, dim=0)
        z += torch.randn(n * patches, self.latent, generator=g)
        return torch.relu(torch.addmm(self.bias, z, self.weight))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="wrn50-l23")
    parser.add_argument("--tiles", type=int, default=20000)
    parser.add_argument("--chunk-tiles", type=int, default=32, help="tiles per add() call")
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--pool-factor", type=int, default=4)
    parser.add_argument("--query-tiles", type=int, default=64)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--tissue-types", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid, dim = PRESETS[args.preset]
    source = SyntheticFeatures(grid, dim, args.latent, args.tissue_types, args.seed)
    builder = CoresetBuilder(
        args.budget,
        projection_dim=args.projection_dim,
        seed=args.seed,
        pool_factor=args.pool_factor,
    )
    rss_before = peak_rss_gib()
    build_s = build_cpu_s = 0.0
    start = time.perf_counter()
    done = 0
    while done < args.tiles:
        n = min(args.chunk_tiles, args.tiles - done)
        chunk = source.tiles(n)
        t0, c0 = time.perf_counter(), time.process_time()
        builder.add(chunk)
        build_s += time.perf_counter() - t0
        build_cpu_s += time.process_time() - c0
        done += n
        del chunk
        if done % 1000 < n:  # progress on stderr, so that a long run can be watched
            print(
                f"{done} tiles, {time.perf_counter() - start:.0f} s, "
                f"CPU {time.process_time():.0f} s, "
                f"{builder.reductions} reductions, peak RSS {peak_rss_gib():.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
    t0, c0 = time.perf_counter(), time.process_time()
    bank = builder.finish()
    build_s += time.perf_counter() - t0
    build_cpu_s += time.process_time() - c0
    wall_s = time.perf_counter() - start
    queries = source.tiles(args.query_tiles)
    t0, c0 = time.perf_counter(), time.process_time()
    distances = nearest_distance(queries, bank)
    search_s = time.perf_counter() - t0
    search_cpu_s = time.process_time() - c0
    radius = covering_radius(queries, bank)
    patches = args.tiles * grid * grid
    row = {
        "preset": args.preset,
        "tiles": args.tiles,
        "patches": patches,
        "feature_dim": dim,
        "budget": args.budget,
        "projection_dim": args.projection_dim,
        "pool_factor": args.pool_factor,
        "threads": args.threads,
        "bank_rows": int(bank.shape[0]),
        "bank_mib": bank.numel() * bank.element_size() / 2**20,
        "reductions": builder.reductions,
        "filtered_fraction": builder.filtered / max(builder.total_seen, 1),
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "wall_s": wall_s,
        "build_patches_per_s": patches / build_s,
        "peak_rss_gib": peak_rss_gib(),
        "rss_before_stream_gib": rss_before,
        "search_queries": int(queries.shape[0]),
        "search_queries_per_s": queries.shape[0] / search_s,
        "search_queries_per_cpu_s": queries.shape[0] / search_cpu_s,
        "search_tiles_per_s": args.query_tiles / search_s,
        "query_mean_distance": float(distances.mean()),
        "query_covering_radius": radius,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print(
        "| "
        + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
        + " |"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=2)


if __name__ == "__main__":
    main()
