"""The sample built on other CPU code paths, on one machine: which bytes move when a library runs the kernels
another CPU would (issue 23).

For each setting of `kvqa.cpu_paths.CPU_PATHS` (one library at a time, then all at once) the embedded sample is
built from scratch (fresh output root and embedding cache) in a process with that environment, and every file
of `stages/`, `augmented/` and `release/` (not the stage markers, which hold timings) is compared by sha256 with
the native build of the same run. Separately, the sample's questions are embedded under each setting and the
vectors compared with the native ones bit for bit: the table shows that vectors move while tables do not.
`--quick`: native and all settings at once only.

    .venv/bin/python benchmarks/cpu_paths.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, print_json, print_table

from dedup.embed import cpu_kernels
from kvqa.cpu_paths import ALL_BASELINE, CPU_PATHS

COMPARED = ("stages", "augmented", "release")
EMBED = """
import sys, numpy as np, pandas as pd
from dedup import SentenceTransformerEncoder, question_vectors
texts, vectors = question_vectors(pd.read_parquet(sys.argv[1]), SentenceTransformerEncoder(), None)
np.save(sys.argv[2], vectors)
"""


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in COMPARED for p in sorted((run / folder).rglob("*"))
            if p.is_file() and not p.name.endswith(".done.json")}


def build(env: dict[str, str], work: Path) -> tuple[dict[str, str], float]:
    """The sample built in a fresh process under `env`; its files' digests and the wall time."""
    started = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "kvqa"), "build", "--output-root", str(work / "runs")], check=True,
                   cwd=ROOT, env={**os.environ, **env, "KVQA_EMBED_CACHE": str(work / "embed-cache")},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return digests(work / "runs" / "sample"), time.perf_counter() - started


def vectors(env: dict[str, str], qa: Path, out: Path) -> np.ndarray:
    subprocess.run([sys.executable, "-c", EMBED, str(qa), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="native and all settings at once only")
    args = parser.parse_args()
    settings = {"all": ALL_BASELINE} if args.quick else {**CPU_PATHS, "all": ALL_BASELINE}
    figures: dict = {"cpu": f"{cpu_model()} ({cpu_kernels()})", "settings": {}}
    with tempfile.TemporaryDirectory(prefix="kvqa-cpu-paths-") as tmp:
        work = Path(tmp)
        native, native_s = build({}, work / "native")
        qa = work / "native" / "runs" / "sample" / "stages" / "qa.parquet"
        reference = vectors({}, qa, work / "native.npy")
        rows = [("setting", "files differ", "build s", "vector rows differ", "max |dv|")]
        rows.append(("native", f"0 / {len(native)}", f"{native_s:.0f}", f"0 / {len(reference)}", "0"))
        for name, env in settings.items():
            found, seconds = build(env, work / name)
            moved = sorted(k for k in native.keys() | found.keys() if native.get(k) != found.get(k))
            v = vectors(env, qa, work / f"{name}.npy")
            rows_differ = int((v != reference).any(axis=1).sum())
            max_diff = float(np.abs(v - reference).max())
            figures["settings"][name] = {"env": env, "files": len(native), "files_differ": len(moved),
                                         "differing": moved[:20], "build_s": round(seconds, 1),
                                         "vector_rows_differ": rows_differ, "vector_max_abs_diff": max_diff}
            rows.append((name, f"{len(moved)} / {len(native)}", f"{seconds:.0f}", f"{rows_differ} / {len(v)}",
                         f"{max_diff:.1e}"))
    figures["native_build_s"] = round(native_s, 1)
    figures["files_differ_total"] = sum(s["files_differ"] for s in figures["settings"].values())
    print_table(f"sample build per CPU code path ({figures['cpu']})", rows)
    print_json(figures)


if __name__ == "__main__":
    main()
