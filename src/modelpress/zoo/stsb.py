"""The STS Benchmark: reading its folder and scoring sentence embeddings on it.

The score is what sentence-transformers' `EmbeddingSimilarityEvaluator` reports (and MTEB
publishes): Spearman correlation x 100 between the cosine similarity of the two sentence
embeddings and the gold similarity.

    >>> pairs = load_split(default_stsb_dir(), "test")   # [(sentence1, sentence2, score), ...]
    >>> spearman_score(lambda s: embed(model, model.tokenizer, s), pairs)
    82.03...
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from modelpress.core.errors import DataError

SPLITS = ("train", "dev", "test")
Pair = tuple[str, str, float]


def default_stsb_dir() -> Path | None:
    """`$MODELPRESS_STSB`, else `../shared/data/stsb` beside the repository root (found from this source file).

    The working directory plays no part: every caller in a process gets the same answer. An explicitly
    set `$MODELPRESS_STSB` is returned as is, so a wrong path fails loudly in `load_split`; without it,
    None when `sts-test.csv` is not in the folder.
    """
    if env := os.environ.get("MODELPRESS_STSB"):
        return Path(env).expanduser()
    return next((folder for folder in stsb_search_paths() if (folder / "sts-test.csv").is_file()), None)


def stsb_search_paths() -> list[Path]:
    """Where `default_stsb_dir` looks without `$MODELPRESS_STSB`: `../shared/data/stsb` beside the root of the
    repository this source file is in (a checkout or an editable install; with an installed wheel, set
    `$MODELPRESS_STSB`)."""
    repo = Path(__file__).resolve().parents[3]  # src/modelpress/zoo/stsb.py -> repository root
    return [(repo / ".." / "shared" / "data" / "stsb").resolve()]


def load_split(folder: str | Path, split: str) -> list[Pair]:
    """`(sentence1, sentence2, score)` of `sts-<split>.csv` in the STS-B `folder`.

    The files are tab-separated (genre, file, year, id, score, sentence1, sentence2, then optional
    source columns) and not quoted: sentences may hold quote characters, so no CSV quoting applies.
    """
    if split not in SPLITS:
        raise DataError(f"STS-B split must be one of {SPLITS}, got {split!r}")
    path = Path(folder) / f"sts-{split}.csv"
    if not path.is_file():
        raise DataError(f"STS-B file {path} not found (expected sts-train/dev/test.csv in {folder})")
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.rstrip("\r\n").split("\t")
            if cols == [""]:
                continue
            try:
                score = float(cols[4])
                s1, s2 = cols[5].strip(), cols[6].strip()
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}:{lineno}: expected tab-separated genre, file, year, id, score, sentence1, "
                    f"sentence2; got {line[:80]!r}"
                ) from None
            if not 0.0 <= score <= 5.0 or not s1 or not s2:
                raise DataError(f"{path}:{lineno}: score must be in [0, 5] and sentences non-empty")
            pairs.append((s1, s2, score))
    if not pairs:
        raise DataError(f"STS-B file {path} holds no sentence pairs")
    return pairs


def spearman_score(embeddings_fn: Callable[[list[str]], torch.Tensor], pairs: Sequence[Pair]) -> float:
    """Spearman correlation x 100 of cosine(embed(s1), embed(s2)) against the gold scores."""
    from scipy.stats import spearmanr

    e1 = torch.as_tensor(embeddings_fn([p[0] for p in pairs])).float()
    e2 = torch.as_tensor(embeddings_fn([p[1] for p in pairs])).float()
    cosine = F.cosine_similarity(e1, e2, dim=-1)
    gold = [p[2] for p in pairs]
    return float(spearmanr(cosine.numpy(), gold).statistic) * 100.0
