"""llm.c's GPT-2 token file, written as llm.c's dev/data/data_common.py `write_datafile` writes it: a header of 256
int32 (magic 20240520, version 1, the token count), then the tokens as uint16. Written here from that description,
not with fwray's code, so a test of fwray's reader checks it against the format rather than against itself."""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fwray.core.tokens import encode_documents, get_tokenizer

FIRST_UNSEEN_ROW = 436  # experiments/smoke-sample.parquet holds rows of the first 436 only: these are not trained on


def write_llmc(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1,
               count: int | None = None) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    return path


def corpus_tokens(corpus: Path, documents: int) -> np.ndarray:
    """Real GPT-2 tokens: `documents` documents of the corpus past the smoke sample's rows, EOT before each."""
    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
    ids, _ = encode_documents(get_tokenizer("gpt2"), texts[FIRST_UNSEEN_ROW:FIRST_UNSEEN_ROW + documents])
    return ids
