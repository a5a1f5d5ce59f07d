"""Convert a GGUF checkpoint into a Hugging Face model folder that `vllm serve` (CPU) can load.

Run by the LLM venv's Python (`kvqa llm-server` does it once; the folder is then reused), not by the
project's: it needs transformers, accelerate and gguf, which only that venv has. No kvqa import here.

    .venv-llm/bin/python kvqa/gguf_to_hf.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into `out` (written to a temp folder, renamed when complete)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # vLLM's CPU backend has no kernel for GGUF's Q4_1 blocks: unpack every weight into a dense model.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    # save_pretrained refuses a model loaded through a quantizer; once dequantized there is none left.
    model.hf_quantizer = None
    # Left in config.json, the GGUF quantization_config would make vLLM look for GGUF weights again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
