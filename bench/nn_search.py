"""Exact nearest-neighbour search: memcontrol's chunked search against faiss-cpu's ``IndexFlatIP`` on identical data.

    python bench/nn_search.py                          # 100k and 1M references, d=512, 1,000 queries
    python bench/nn_search.py --sizes 100000 --threads 2 --json nn.json

For each size, random unit vectors (seeded) are written once to a float32 file in a temporary folder. Every method
then runs in its own forked process, so that its memory is measured alone:

* ``memcontrol (memmap)``: ``nearest_neighbours`` reading the references from the ``np.memmap`` file, chunk by chunk;
* ``memcontrol (in RAM)``: the same search on the references loaded into memory first (load not timed);
* ``faiss IndexFlatIP``: the references added to the index (the add is timed separately), then ``index.search``.

Time is wall-clock of the search call (median of ``--repeats``). Memory is the peak, above the process's level before
the method started, of the anonymous resident memory (``RssAnon`` in /proc/self/status, sampled every 5 ms by a
thread): heap and tensors, not the page cache that a memory-mapped file occupies while it is read (that is
reclaimable, and reported separately as the peak of ``RssFile``). The references loaded into RAM for the second and
third rows are counted, since those methods need them there. Results are checked to agree: the fraction of queries
whose top-k indices are identical, and the largest difference of the similarities.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Samples RssAnon and RssFile in a thread; ``peaks`` are the maxima above the levels at start."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.base = (proc_status("RssAnon"), proc_status("RssFile"))
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak[0] = max(self.peak[0], proc_status("RssAnon"))
            self.peak[1] = max(self.peak[1], proc_status("RssFile"))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak[0] = max(self.peak[0], proc_status("RssAnon"))

    @property
    def anon_mb(self) -> float:
        return (self.peak[0] - self.base[0]) / 2**20

    @property
    def file_mb(self) -> float:
        return (self.peak[1] - self.base[1]) / 2**20


def write_unit_vectors(path: Path, n: int, d: int, seed: int, block: int = 65536) -> None:
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), d), dtype=np.float32)
        mm[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    mm.flush()


def run_method(method: str, path: str, n: int, d: int, queries: np.ndarray, k: int, threads: int, repeats: int,
               chunk: int, out: mp.Queue) -> None:
    import faiss
    import torch

    from memcontrol.metrics import nearest_neighbours

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    refs = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    # Warm up both libraries (thread pools, first allocations) before memory is measured.
    small = np.ascontiguousarray(queries[:4])
    nearest_neighbours(torch.from_numpy(small), small, k=1, progress=False)
    faiss.IndexFlatIP(d).search(small, 1)
    times, extra = [], {}
    with PeakMemory() as mem:
        if method == "faiss":
            t = time.perf_counter()
            index = faiss.IndexFlatIP(d)
            for start in range(0, n, 65536):  # add in blocks: no second full copy beside the index's own
                index.add(np.ascontiguousarray(refs[start:start + 65536]))
            extra["add_s"] = time.perf_counter() - t
            for _ in range(repeats):
                t = time.perf_counter()
                sims, idx = index.search(queries, k)
                times.append(time.perf_counter() - t)
        else:
            data = refs if method == "memmap" else np.array(refs)
            for _ in range(repeats):
                t = time.perf_counter()
                s, i = nearest_neighbours(torch.from_numpy(queries), data, k=k, chunk_size=chunk, progress=False)
                times.append(time.perf_counter() - t)
            sims, idx = s.numpy(), i.numpy()
    out.put({"method": method, "search_s": statistics.median(times), "peak_anon_mb": mem.anon_mb,
             "peak_file_mb": mem.file_mb, "sims": sims, "idx": idx, **extra})


def bench_size(n: int, d: int, n_queries: int, k: int, threads: int, repeats: int, chunk: int, folder: Path) -> list:
    path = folder / f"refs_{n}x{d}.f32"
    write_unit_vectors(path, n, d, seed=n)
    q = np.random.default_rng(1).standard_normal((n_queries, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ctx = mp.get_context("fork")
    results = {}
    for method in ("memmap", "ram", "faiss"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_method, args=(method, str(path), n, d, q, k, threads, repeats, chunk, queue))
        proc.start()
        results[method] = queue.get()
        proc.join()
    ref = results["faiss"]
    rows = []
    labels = {"memmap": "memcontrol (memmap)", "ram": "memcontrol (in RAM)", "faiss": "faiss IndexFlatIP"}
    for method, label in labels.items():
        r = results[method]
        rows.append({
            "n": n, "d": d, "queries": n_queries, "k": k, "method": label,
            "search_s": round(r["search_s"], 3), "vs_faiss": round(r["search_s"] / ref["search_s"], 2),
            "peak_anon_mb": round(r["peak_anon_mb"], 1), "peak_file_mb": round(r["peak_file_mb"], 1),
            "add_s": round(r.get("add_s", 0.0), 3),
            "same_topk": float((r["idx"] == ref["idx"]).all(axis=1).mean()),
            "max_sim_diff": float(np.abs(r["sims"] - ref["sims"]).max()),
        })
    path.unlink()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16384, help="references per chunk in memcontrol's search")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the temporary reference files")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.sizes:
            rows += bench_size(n, args.dim, args.queries, args.k, args.threads, args.repeats, args.chunk, Path(tmp))
            for row in rows[-3:]:
                print(f"{row['n']:>9,} {row['method']:<22} search {row['search_s']:8.3f} s  "
                      f"x{row['vs_faiss']:<5} anon +{row['peak_anon_mb']:8.1f} MB  file +{row['peak_file_mb']:8.1f} MB"
                      f"  same top-k {row['same_topk']:.3f}  max |dsim| {row['max_sim_diff']:.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
