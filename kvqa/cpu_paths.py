"""Environment settings that move kvqa's libraries off the code paths they pick for this CPU.

Every library that computes kvqa's bytes chooses its kernels at run time by instruction set (and MKL by CPU
vendor): torch (ATen, oneDNN, MKL) for the embedding vectors, numpy, OpenCV and libjpeg-turbo for the augmented
images, faiss for the similarity search, OpenBLAS under numpy. A release rebuilt on another CPU runs other
kernels; these settings let one machine run the paths another CPU would, so the cross-machine claims of README
("Determinism") are tested on whatever CPU CI has (`tests/test_flow.py`) and measured per library
(`benchmarks/cpu_paths.py`).

Each setting forces a path below AVX2 where the library allows it, so it is a different path on every CPU of
this project's kind (AVX2-only Zen and AVX-512 Xeons alike): forcing "AVX2" would change nothing on an AVX2-only
machine. Names are the libraries' own: OpenCV's are dash-separated (`AVX512-SKX`; underscore names are ignored),
faiss 1.15 reads `FAISS_SIMD_LEVEL` (`FAISS_OPT_LEVEL` no longer has an effect), MKL's `MKL_CBWR=COMPATIBLE` is
its one vendor-neutral branch (AVX2/AVX512 branches are refused on AMD CPUs). ONNX Runtime's MLAS cannot be
forced.
"""

from __future__ import annotations

CPU_PATHS: dict[str, dict[str, str]] = {
    "torch": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    "numpy": {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"},
    "opencv": {"OPENCV_CPU_DISABLE": "AVX512-SKX,AVX512-CLX,AVX2,FP16,AVX"},
    "faiss": {"FAISS_SIMD_LEVEL": "NONE"},
    "libjpeg-turbo": {"JSIMD_FORCESSE2": "1"},
    "openblas": {"OPENBLAS_CORETYPE": "Nehalem"},
}

# Every library off its native path at once: what the test suite's resumed build runs under.
ALL_BASELINE: dict[str, str] = {k: v for setting in CPU_PATHS.values() for k, v in setting.items()}
