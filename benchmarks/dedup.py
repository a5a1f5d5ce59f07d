"""Dedup at the release's size, the torch model against faster runtimes of the same model in one run: ~157k
template QA pairs of the real slice scaled to 58,849 label rows (`--quick`: 5,000).

Candidates (`--backends`, torch always first as the reference): `onnx` (the project's `dedup.backend: onnx`:
fp32 export, ONNX Runtime's load-time optimizations); `onnx-o3` (that export through ONNX Runtime's
transformer optimizer with fused attention, skip-layer-norm and the approximate GELU: Optimum's "O3");
`onnx-int8` (dynamic int8 quantization with Optimum's `avx2` settings: uint8 weights, symmetric, per
channel, MatMul only — this CPU has AVX2 but no AVX-512/VNNI); `openvino` (the fp32 export compiled by
OpenVINO, if it is installed). sentence-transformers' own `export_optimized_onnx_model` /
`export_dynamic_quantized_onnx_model` / `backend="openvino"` need optimum-onnx / optimum-intel, which cannot
be installed beside sentence-transformers 6.2 (transformers >= 5): the variants are made here with the same
ONNX Runtime tools those functions call.

Per candidate: the end-to-end `deduplicate` (image + global scopes) from an empty embedding cache, and where
its time goes (model calls, tokenisation, normalise + cache, image scope, global scope); the ratio to torch
in the same run; agreement with torch: kept/removed and the rule of every row, the cross-split leaking test
rows (a seeded 90/10 image split, every image its own content) and the image-scope decision on the
calibration pairs at the configured threshold. Goal (issue 13): `deduplicate` <= 120 s at full size (3x),
decisions identical on >= 99.9 % of rows.

    .venv/bin/python benchmarks/dedup.py [--quick] [--backends onnx,onnx-o3,onnx-int8,openvino]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import base_csv, peak_rss_mib, print_json, print_table, scale_metadata

from dedup import (EmbeddingCache, OnnxEncoder, SentenceTransformerEncoder, calibration_pairs, cross_split_leakage,
                   deduplicate, evaluate_threshold, question_vectors)
from dedup.calibration import pair_similarities
from dedup.embed import session_options
from dedup.frames import nearest_cross_split_pairs
from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from kvqa.catalog import load_catalog
from kvqa.config import DedupConfig, GenerateConfig, KvasirVQASource, PlanConfig
from kvqa.tables import atomic_path
from kvqa.text import normalise_text
from sources import read_sources

CANDIDATES = ("onnx", "onnx-o3", "onnx-int8", "openvino")


class VariantEncoder(OnnxEncoder):
    """The project's ONNX export, turned into another model file (`make(src, dest)`) and run by `runtime`
    (`ort` or `openvino`), with the same tokenizer, pooling and norm as `OnnxEncoder`."""

    def __init__(self, export_root: Path, label: str, make=None, runtime: str = "ort"):
        super().__init__(export_root=export_root)
        self.label, self.make, self.runtime = label, make, runtime
        self.model_id = f"{self.model_id}+{label}"
        self.vectors_id = f"{self.vectors_id}+{label}"

    def replica(self) -> "VariantEncoder":
        self.load()  # the variant's model file is made once, here
        return VariantEncoder(self.export_root, self.label, self.make, self.runtime)

    def load(self) -> None:
        if self._session is not None:
            return
        super().load()
        path = self.export_dir / "model.onnx"
        if self.make is not None:
            path = self.export_root / f"model-{self.label}.onnx"
            if not path.exists():
                with atomic_path(path) as tmp:
                    self.make(self.export_dir / "model.onnx", tmp)
        if self.runtime == "openvino":
            self._session = OpenVinoSession(path)
        else:
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]


class OpenVinoSession:
    """The part of an ONNX Runtime session `OnnxEncoder.encode` uses, run by OpenVINO on the CPU."""

    def __init__(self, path: Path):
        import openvino as ov

        # one thread per session, as the project's encoders (dedup.embed.session_options)
        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})

    def get_inputs(self):
        return [type("Input", (), {"name": i.get_any_name()})() for i in self.compiled.inputs]

    def run(self, _outputs, feeds):
        return [self.compiled(feeds)[self.compiled.outputs[0]]]


def optimize_o3(src: Path, dest: Path) -> None:
    """Optimum's O3 on the CPU: ONNX Runtime's BERT fusions (attention, skip-layer-norm, bias-GELU) with
    the GELU approximation."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_gelu_approximation = True
    optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=2,
                   optimization_options=options, use_gpu=False).save_model_to_file(str(dest))


def quantize_int8_avx2(src: Path, dest: Path) -> None:
    """Optimum's `AutoQuantizationConfig.avx2(is_static=False)`, the config sentence-transformers'
    `export_dynamic_quantized_onnx_model(model, "avx2", ...)` uses: dynamic, uint8 activations and
    symmetric uint8 weights per channel, full range."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dest), per_channel=True, reduce_range=False, weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["MatMul"],
                     extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def make_candidate(name: str, export_root: Path) -> OnnxEncoder:
    if name == "onnx":
        return OnnxEncoder(export_root=export_root)
    if name == "onnx-o3":
        return VariantEncoder(export_root, name, optimize_o3)
    if name == "onnx-int8":
        return VariantEncoder(export_root, name, quantize_int8_avx2)
    if name == "openvino":
        return VariantEncoder(export_root, name, runtime="openvino")
    raise ValueError(name)


class TimedEncoder:
    """Counts the seconds spent in the model's `encode` (tokenisation + model + pooling), summed over the
    threads that encode (`replica`): thread-seconds."""

    def __init__(self, inner, parent: "TimedEncoder | None" = None):
        self.inner, self.model_id, self.vectors_id = inner, inner.model_id, inner.vectors_id
        self.parent, self.encode_s, self._lock = parent, 0.0, threading.Lock()

    @property
    def texts_encoded(self) -> int:
        return self.inner.texts_encoded

    @texts_encoded.setter
    def texts_encoded(self, n: int) -> None:
        self.inner.texts_encoded = n

    def replica(self) -> "TimedEncoder":
        return TimedEncoder(self.inner.replica(), self)

    def encode(self, texts):
        t0 = time.perf_counter()
        try:
            return self.inner.encode(texts)
        finally:
            timer = self.parent or self
            with timer._lock:
                timer.encode_s += time.perf_counter() - t0


def row_decisions(qa: pd.DataFrame, duplicates: pd.DataFrame) -> pd.Series:
    """Per qa_id: "kept", or "<scope>/<rule>" of its removal."""
    removed = dict(zip(duplicates["qa_id"], duplicates["scope"] + "/" + duplicates["rule"]))
    return pd.Series([removed.get(q, "kept") for q in qa["qa_id"]], index=qa["qa_id"])


def leakage_set(qa: pd.DataFrame, vectors: np.ndarray, threshold: float) -> set[tuple[str, str]]:
    """(test qa_id, train qa_id) of a seeded 10 % test split of the images, copies of one real image sharing
    its content. Copies repeat questions, so a test row often ties between train rows: which one is named
    is then a float tie-break, while whether the test row leaks is the decision."""
    images = sorted(qa["img_id"].unique())
    test = set(np.random.default_rng(42).choice(images, max(1, len(images) // 10), replace=False))
    splits = pd.DataFrame({"source": qa["source"].iloc[0], "img_id": images,
                           "split": ["test" if i in test else "train" for i in images]})
    content = pd.DataFrame({"source": qa["source"].iloc[0], "img_id": images,
                            "sha256": [i.rsplit("r", 1)[0] for i in images]})  # copies of a real image: same frame
    leaks = cross_split_leakage(qa, vectors, nearest_cross_split_pairs(content, splits), threshold, 0)
    return set(zip(leaks["test_qa_id"], leaks["train_qa_id"]))


def measure(name: str, encoder, qa: pd.DataFrame, config: DedupConfig, pairs: pd.DataFrame, tmp: Path) -> dict:
    timed = TimedEncoder(encoder)
    cache = EmbeddingCache(tmp / f"cache-{name}", encoder.vectors_id)
    t0 = time.perf_counter()
    _, dups, _, timings = deduplicate(qa, config, timed, cache, seed=42)
    dedup_s = time.perf_counter() - t0
    _, vectors = question_vectors(qa, encoder, cache)  # from the cache: nothing embedded again
    return {"dedup_s": dedup_s, "embed_s": timings["embed_s"], "encode_s": timed.encode_s,
            "global_s": timings["global_s"], "embedded": timings["texts_embedded"], "removed": len(dups),
            "decisions": row_decisions(qa, dups), "leaks": leakage_set(qa, vectors, config.threshold),
            "pair_sims": pair_similarities(pairs, encoder)}


def share_same(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5,000 label rows instead of 58,849")
    ap.add_argument("--label-rows", type=int, help="label rows to scale the real slice to (a smoke test)")
    ap.add_argument("--backends", default=",".join(CANDIDATES),
                    help=f"candidates to compare with torch, comma-separated, of {', '.join(CANDIDATES)}")
    args = ap.parse_args()
    names = [n for n in args.backends.split(",") if n]
    if "openvino" in names and importlib.util.find_spec("openvino") is None:
        print("openvino is not installed: left out (pip install openvino to measure it)")
        names.remove("openvino")
    catalog = load_catalog()
    config = DedupConfig()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scale_metadata(base_csv(), tmp / "m.csv", args.label_rows or (5_000 if args.quick else 58_849))
        facts = read_sources([KvasirVQASource(metadata_csv=tmp / "m.csv", image_dir=tmp)], catalog).facts
        qa, _ = realize_plans(compose_plans(facts, PlanConfig(), 42), facts,
                              make_backend(GenerateConfig(), catalog, 42), GroundingChecker(catalog))
        distinct = sorted(set(normalise_text(q, punctuation=False) for q in qa["question"]))
        pairs = calibration_pairs(catalog)
        onnx = OnnxEncoder(export_root=tmp / "models")
        t0 = time.perf_counter()
        onnx.load()  # the one-time export into an empty folder, then opening it
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        onnx._tokenizer.encode_batch(distinct)  # the fast tokenizer alone: part of every backend's encode
        tokenize_s = time.perf_counter() - t0
        encoders = {"torch": SentenceTransformerEncoder()}
        encoders.update({n: onnx if n == "onnx" else make_candidate(n, tmp / "models") for n in names})
        for encoder in encoders.values():
            encoder.encode(["warm up"])  # load (and for variants, make) the model outside the timings
        runs, loads = {}, {}
        for name, encoder in encoders.items():
            runs[name] = measure(name, encoder, qa, config, pairs, tmp)
            loads[name] = round(os.getloadavg()[0], 2)
            print(f"{name}: {runs[name]['dedup_s']:.1f} s, load average {loads[name]}", flush=True)
        t0 = time.perf_counter()
        rerun = OnnxEncoder(export_root=tmp / "models")  # reads the cache `measure("onnx", ...)` wrote
        deduplicate(qa, config, rerun, EmbeddingCache(tmp / "cache-onnx", rerun.vectors_id), seed=42)
        rerun_s = time.perf_counter() - t0
    t = runs["torch"]
    rows = [("load average (1 min) before / after each", f"{load_before[0]:.2f}",
             " | ".join(f"{loads[n]:.2f}" for n in runs)),
            ("deduplicate end to end (image + global scopes), s", *(round(r["dedup_s"], 1) for r in runs.values())),
            ("  model encode calls (tokenise + model + pool), thread-s", *(round(r["encode_s"], 1) for r in runs.values())),
            ("  normalise, distinct, cache lookup + write, s",
             *(round(r["embed_s"] - r["encode_s"], 2) for r in runs.values())),
            ("  image scope and tables, s",
             *(round(r["dedup_s"] - r["embed_s"] - r["global_s"], 2) for r in runs.values())),
            ("  global scope (faiss range search), s", *(round(r["global_s"], 2) for r in runs.values())),
            ("texts embedded / thread-s", *(round(r["embedded"] / r["encode_s"], 1) for r in runs.values())),
            ("ratio to torch, end to end | model", "1", *(f"{t['dedup_s'] / r['dedup_s']:.2f}x | "
                                                          f"{t['encode_s'] / r['encode_s']:.2f}x"
                                                          for r in list(runs.values())[1:])),
            ("goal: deduplicate <= 120 s (full size)", *("met" if r["dedup_s"] <= 120 else "not met"
                                                         for r in runs.values())),
            ("rows removed", *(r["removed"] for r in runs.values()))]
    figures = {n: {} for n in runs}
    for name, r in list(runs.items())[1:]:
        leak_rows = {test for test, _ in r["leaks"]}
        torch_leak_rows = {test for test, _ in t["leaks"]}
        decided, torch_decided = r["pair_sims"] >= config.threshold, t["pair_sims"] >= config.threshold
        figures[name] = {
            "rows_same_decision": float((t["decisions"] == r["decisions"]).mean()),
            "leaking_rows": len(leak_rows), "leaking_rows_same": share_same(torch_leak_rows, leak_rows),
            "leak_pairs_same": share_same(t["leaks"], r["leaks"]),
            "calibration_pairs_same_decision": float((decided == torch_decided).mean()),
            "calibration_pairs_flipped": int((decided != torch_decided).sum()),
            "calibration_max_sim_diff": float(np.abs(t["pair_sims"] - r["pair_sims"]).max())}
    scores = {n: evaluate_threshold(pairs, None, config.threshold, r["pair_sims"])["all"] for n, r in runs.items()}
    later = list(runs)[1:]
    rows += [("rows with the same decision as torch", "", *(f"{figures[n]['rows_same_decision']:.4%}" for n in later)),
             ("cross-split leaking test rows (same rows as torch)", len({x for x, _ in t["leaks"]}),
              *(f"{figures[n]['leaking_rows']} ({figures[n]['leaking_rows_same']:.4%})" for n in later)),
             ("  (test row, train row) pairs, same as torch (ties)", "",
              *(f"{figures[n]['leak_pairs_same']:.2%}" for n in later)),
             (f"calibration pairs: same decision at {config.threshold} (of {len(pairs):,})", "",
              *(f"{figures[n]['calibration_pairs_same_decision']:.4%} ({figures[n]['calibration_pairs_flipped']} "
                "flipped)" for n in later)),
             ("calibration pairs: max |cosine difference|", "",
              *(f"{figures[n]['calibration_max_sim_diff']:.1e}" for n in later)),
             ("calibration: precision / recall / FPR", *("/".join(str(scores[n][k]) for k in
              ("precision", "recall", "false_positive_rate")) for n in runs)),
             ("fast tokenizer alone over the distinct texts, s", f"{tokenize_s:.2f}"),
             ("onnx export, one time (fresh folder), s", f"{export_s:.1f}"),
             ("onnx re-run from the caches, s (texts embedded)", f"{rerun_s:.2f} ({rerun.texts_encoded})"),
             ("peak RSS MiB", peak_rss_mib())]
    print_table(f"dedup: {len(qa):,} QA rows, {len(distinct):,} distinct normalised questions; "
                + " | ".join(runs), rows)
    print_json({"benchmark": "dedup", "rows": len(qa), "distinct_texts": len(distinct),
                "load_average_before": round(load_before[0], 2), "load_average_after": loads,
                "backends": {n: {"dedup_s": round(r["dedup_s"], 3), "embed_s": round(r["embed_s"], 3),
                                 "encode_s": round(r["encode_s"], 3), "global_s": round(r["global_s"], 3),
                                 "ratio_end_to_end": round(t["dedup_s"] / r["dedup_s"], 3),
                                 "ratio_model": round(t["encode_s"] / r["encode_s"], 3),
                                 "goal_120s_met": r["dedup_s"] <= 120, "rows_removed": r["removed"],
                                 **{k: (round(v, 6) if isinstance(v, float) and k != "calibration_max_sim_diff" else v)
                                    for k, v in figures[n].items()}}
                             for n, r in runs.items()},
                "tokenize_s": round(tokenize_s, 3), "onnx_export_s": round(export_s, 2),
                "onnx_rerun_s": round(rerun_s, 3), "onnx_rerun_texts_embedded": rerun.texts_encoded,
                "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
