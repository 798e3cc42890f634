"""Near-duplicate detection: MinHash signatures over word 3-gram shingles, LSH banding, exact Jaccard check.

What: two records are near-duplicates when the Jaccard similarity of their sets of word 3-grams (lower-cased
``\\w+`` words of question + answer; each character of a script without spaces is a word) is at least the
threshold. Given the question/answer ``pairs``, the check is stricter: the questions' word sets and the answers'
word 3-grams must both reach the threshold, so a long shared preamble (or one shared answer) alone does not make
two different tasks duplicates. MinHash (Broder 1997) estimates it from K
per-record minima; LSH banding (Indyk & Motwani 1998) turns "similar signatures" into "same bucket in one of
b bands", so candidates are found without comparing all pairs. Every candidate pair is then checked with the
exact Jaccard similarity, so a reported pair is never a hashing accident.

Cost: one regex pass and one dict look-up per word in Python; hashing and minima are vectorised with numpy in
batches (K multiply-shift hashes per shingle), so a million records of ~80 words take seconds and a few hundred MB.
Sharp edge: texts of fewer than 3 words have one padded shingle, so two such texts match only when identical.

    from src.data_processing.near_duplicates import find_near_duplicates
    find_near_duplicates(["a b c d", "a b c d e"], [0.9, 0.8], threshold=0.5)  # -> [(1, 0, 0.667)]
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

from src.data_processing.text_quality import NO_SPACE

WORD = re.compile(f"[{NO_SPACE}]|[^\\W{NO_SPACE}]+")
SHINGLE_WORDS = 3
DEFAULT_NUM_PERM = 32
MAX_ALL_PAIRS_BUCKET = 50  # bigger LSH buckets are checked as a star around their best member plus a chain
_P1, _P2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd mixing constants
_CACHE_LIMIT = 4_000_000


class MinHasher:
    """K-permutation MinHash over word 3-gram shingles, deterministic for a seed (no Python ``hash``)."""

    def __init__(self, num_perm: int = DEFAULT_NUM_PERM, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, 2 ** 63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64)
        self._word_ids: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        cache = self._word_ids
        words = WORD.findall(text.lower())
        get = cache.get
        ids = [get(w) for w in words]  # a comprehension: the per-word cost of this stage
        if None in ids:
            for k, w in enumerate(words):
                if ids[k] is None:
                    i = zlib.crc32(w.encode("utf-8", "surrogatepass")) + 1  # 0 is the padding word
                    if len(cache) < _CACHE_LIMIT:
                        cache[w] = i
                    ids[k] = i
        if len(ids) < SHINGLE_WORDS:
            ids.extend([0] * (SHINGLE_WORDS - len(ids)))
        return ids

    def signatures(self, texts: Iterable[str], batch: int = 20000) -> np.ndarray:
        """``(N, K)`` uint32 MinHash signatures of ``texts``."""
        out = []
        chunk: list[list[int]] = []
        for text in texts:
            chunk.append(self._ids(text))
            if len(chunk) == batch:
                out.append(self._batch(chunk))
                chunk = []
        if chunk:
            out.append(self._batch(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.num_perm), dtype=np.uint32)

    def _batch(self, id_lists: list[list[int]]) -> np.ndarray:
        lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter((i for x in id_lists for i in x), dtype=np.uint64, count=int(lengths.sum()))
        ends = np.cumsum(lengths)
        # Shingle j of the batch starts at word j; it is valid when its 3 words belong to one record.
        valid = np.ones(len(ids) - 2, dtype=bool)
        valid[ends[:-1] - 2] = False
        valid[ends[:-1] - 1] = False
        shingles = (ids[:-2] * _P1 + ids[1:-1] * _P2 + ids[2:])[valid]  # uint64, wraps on purpose
        starts = np.concatenate(([0], np.cumsum(lengths - 2)[:-1]))  # every record has >= 1 shingle
        sig = np.empty((len(id_lists), self.num_perm), dtype=np.uint32)
        for k in range(self.num_perm):
            hashed = (shingles * self.a[k] + self.b[k]) >> np.uint64(32)  # multiply-shift universal hash
            sig[:, k] = np.minimum.reduceat(hashed, starts)
        return sig


def shingle_set(text: str) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return {tuple(words)}
    return set(zip(words, words[1:], words[2:]))


def word_set(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _pair_sets(pair: tuple[str, str]) -> tuple[set, set]:
    return word_set(pair[0]), shingle_set(pair[1])


def choose_bands(num_perm: int, threshold: float, recall: float = 0.95) -> tuple[int, int]:
    """``(bands, rows)`` with bands * rows = num_perm: the most selective split that still makes a pair at the
    threshold a candidate with probability >= ``recall`` (1 - (1 - t^r)^b); the most sensitive one otherwise."""
    options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    good = [(b, r) for b, r in options if 1 - (1 - threshold ** r) ** b >= recall]
    return max(good, key=lambda br: br[1]) if good else (num_perm, 1)


def candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Index pairs ``(i, j)``, i < j, that share the bucket of at least one band."""
    pairs: set[tuple[int, int]] = set()
    n = len(sig)
    if n < 2:
        return pairs
    mult = np.random.default_rng(7).integers(1, 2 ** 63, rows, dtype=np.uint64) | np.uint64(1)
    for band in range(bands):
        cols = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
        keys = (cols * mult).sum(axis=1)  # uint64, wraps; a collision only costs one exact check
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        # Runs of equal keys: starts where a run begins, the run continues while `same` holds.
        edges = np.flatnonzero(np.diff(np.concatenate(([0], same.astype(np.int8), [0]))))
        for start, stop in zip(edges[::2], edges[1::2]):
            members = sorted(order[start:stop + 1].tolist())
            if len(members) <= MAX_ALL_PAIRS_BUCKET:
                pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1:])
            else:
                head = members[0]
                pairs.update((head, b) for b in members[1:])
                pairs.update(zip(members[1:], members[2:]))
    return pairs


def find_near_duplicates(texts: Sequence[str], quality: Sequence[float], threshold: float, protected: int = 0,
                         num_perm: int = DEFAULT_NUM_PERM, seed: int = 1,
                         signatures: np.ndarray | None = None,
                         pairs: Callable[[int], tuple[str, str]] | None = None) -> list[tuple[int, int, float]]:
    """Which texts to drop as near-duplicates: ``(dropped, kept_instead, jaccard)`` triples.

    With ``pairs`` (index -> (question, answer)) the similarity of a candidate is min(Jaccard of the question
    word sets, Jaccard of the answer 3-gram sets), else the Jaccard of the texts' 3-gram sets.
    The first ``protected`` texts (the test set) are never dropped and not compared with each other. The others
    are visited best first (quality descending, then input order): one is dropped when it is near a text already
    kept, so of each group the better copy stays.
    """
    if not texts:
        return []
    sig = signatures if signatures is not None else MinHasher(num_perm, seed).signatures(texts)
    bands, rows = choose_bands(sig.shape[1], threshold)
    neighbours: dict[int, list[tuple[int, float]]] = defaultdict(list)
    sets: dict[int, set] = {}
    for i, j in candidate_pairs(sig, bands, rows):
        if j < protected:
            continue
        if pairs is not None:
            si = sets.get(i) or sets.setdefault(i, _pair_sets(pairs(i)))
            sj = sets.get(j) or sets.setdefault(j, _pair_sets(pairs(j)))
            sim = min(jaccard(si[0], sj[0]), jaccard(si[1], sj[1]))
        else:
            si = sets.get(i) or sets.setdefault(i, shingle_set(texts[i]))
            sj = sets.get(j) or sets.setdefault(j, shingle_set(texts[j]))
            sim = jaccard(si, sj)
        if sim >= threshold:
            neighbours[i].append((j, sim))
            neighbours[j].append((i, sim))
    if not neighbours:
        return []
    kept: set[int] = set(range(protected))
    dropped = []
    order = sorted((i for i in neighbours if i >= protected), key=lambda i: (-quality[i], i))
    for i in order:
        near = [(j, sim) for j, sim in neighbours[i] if j in kept]
        if near:
            j, sim = max(near, key=lambda js: (js[1], -js[0]))
            dropped.append((i, j, round(sim, 4)))
        else:
            kept.add(i)
    return sorted(dropped)
