"""Near-duplicate detection: MinHash signatures over word 3-gram shingles, LSH banding, exact similarity check.

What: two records are near-duplicates when their questions say the same and their answers nearly repeat each
other: ``pair_similarity`` = min(question similarity, answer similarity) is at least the threshold (0.8 by
default), so a long shared preamble (or one shared answer) alone does not make two different tasks duplicates.
- answer similarity: the Jaccard similarity of the answers' sets of word 3-grams (lower-cased ``\\w+`` words; each
  character of a script without spaces is a word);
- question similarity: a Jaccard similarity of the questions' word sets that forgives what does not change a
  question: contractions are spelt out ("what's" = "what is"), articles are left out, word order does not count,
  and two words of 5+ letters without digits one edit apart (a typo, a plural) count as the same word. So "What's a
  firewall?", "What is a firewal?", "What is the firewall?" and "A firewall is what?" all equal "What is a
  firewall?" (1.0), while "What does setting 12 control?" and "... setting 13 ..." stay apart.
Data preparation drops the worse copy of such pairs and every training record near a held-out question; the
evaluator (src/training/evaluate_model.py) flags test questions near a training record with the same measure
and the same candidate search (``held_out_overlaps``), so a test set preparation wrote is never flagged.

Candidates: MinHash (Broder 1997) of the answers' 3-gram sets estimates their Jaccard from K per-record minima;
LSH banding (Indyk & Motwani 1998) turns "similar signatures" into "same bucket in one of b bands", so candidates
are found without comparing all pairs. An answer similarity at the threshold is required, so candidates from the
answers alone miss nothing the measure would keep (a pair at the threshold is a candidate with probability >= 0.95).
Every candidate pair is then checked exactly, so a reported pair is never a hashing accident.

Cost: one regex pass and one dict look-up per word in Python; hashing and minima are vectorised with numpy in
batches (K multiply-shift hashes per shingle), so a million records of ~80 words take seconds and a few hundred MB.
Sharp edge: texts of fewer than 3 words have one padded shingle, so two such answers match only when identical.

    from src.data_processing.near_duplicates import find_near_duplicates, pair_similarity
    find_near_duplicates(["a b c d", "a b c d e"], [0.9, 0.8], threshold=0.5)  # -> [(1, 0, 0.667)]
    pair_similarity(("What's a firewall?", "It filters traffic."), ("What is a firewall?", "It filters traffic."))
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
DEFAULT_THRESHOLD = 0.8  # preparation's --near_dup_threshold default and the evaluator's measure
MINHASH_SEED = 1  # fixed, so preparation and the evaluator draw the same candidates
MAX_ALL_PAIRS_BUCKET = 50  # bigger LSH buckets are checked as a star around their best member plus a chain
_P1, _P2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd mixing constants
_CACHE_LIMIT = 4_000_000
ARTICLES = frozenset({"a", "an", "the"})
# The pieces \w+ cuts a contraction into, spelt out ("what's" -> what, s -> what is; "don't" -> do not).
CONTRACTIONS = {"s": "is", "re": "are", "m": "am", "ve": "have", "ll": "will", "d": "would", "t": "not",
                "don": "do", "doesn": "does", "didn": "did", "isn": "is", "aren": "are", "wasn": "was",
                "weren": "were", "haven": "have", "hasn": "has", "shouldn": "should", "couldn": "could",
                "wouldn": "would"}
TYPO_MIN_LETTERS = 5  # shorter words one edit apart are often different words (cat / car)


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


def question_terms(text: str) -> frozenset[str]:
    """A question's words as the question measure compares them: contractions spelt out, articles left out."""
    out = set()
    for w in WORD.findall(text.lower()):
        w = CONTRACTIONS.get(w, w)
        if w not in ARTICLES:
            out.add(w)
    return frozenset(out)


def one_edit_apart(a: str, b: str) -> bool:
    """Words of ``TYPO_MIN_LETTERS``+ letters without digits that one insertion, deletion, substitution or swap of
    two neighbours turns into each other (Damerau-Levenshtein distance 1)."""
    if min(len(a), len(b)) < TYPO_MIN_LETTERS or abs(len(a) - len(b)) > 1 or a == b:
        return False
    if any(c.isdigit() for c in a + b):
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[i + 1:] == shorter[i:]


def soft_jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity in which words one edit apart (``one_edit_apart``) also count as shared, each word
    paired at most once."""
    matched = len(a & b)
    rest_b = sorted(b - a)
    for x in sorted(a - b):
        for k, y in enumerate(rest_b):
            if one_edit_apart(x, y):
                matched += 1
                del rest_b[k]
                break
    union = len(a) + len(b) - matched
    return matched / union if union else 1.0


def question_similarity(a: str, b: str) -> float:
    return soft_jaccard(question_terms(a), question_terms(b))


def answer_similarity(a: str, b: str) -> float:
    return jaccard(shingle_set(a), shingle_set(b))


def pair_similarity(first: tuple[str, str], second: tuple[str, str]) -> float:
    """The near-duplicate measure of two ``(question, answer)`` pairs: min(question, answer similarity)."""
    return min(question_similarity(first[0], second[0]), answer_similarity(first[1], second[1]))


def _pair_sets(pair: tuple[str, str]) -> tuple[frozenset, set]:
    return question_terms(pair[0]), shingle_set(pair[1])


def _pair_sim(si: tuple, sj: tuple) -> float:
    return min(soft_jaccard(si[0], sj[0]), jaccard(si[1], sj[1]))


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
                         num_perm: int = DEFAULT_NUM_PERM, seed: int = MINHASH_SEED,
                         signatures: np.ndarray | None = None,
                         pairs: Callable[[int], tuple[str, str]] | None = None) -> list[tuple[int, int, float]]:
    """Which texts to drop as near-duplicates: ``(dropped, kept_instead, similarity)`` triples.

    With ``pairs`` (index -> (question, answer)) the similarity of a candidate is ``pair_similarity`` and the
    candidates come from the answers' signatures (``signatures``, when given, must be those); else it is the
    Jaccard of the texts' 3-gram sets, candidates from the texts.
    The first ``protected`` texts (the test set) are never dropped and not compared with each other. The others
    are visited best first (quality descending, then input order): one is dropped when it is near a text already
    kept, so of each group the better copy stays.
    """
    if not texts:
        return []
    if signatures is None:
        hasher = MinHasher(num_perm, seed)
        signatures = hasher.signatures((pairs(i)[1] for i in range(len(texts))) if pairs is not None else texts)
    neighbours = _neighbours(signatures, threshold, texts, pairs, lambda i, j: j >= protected)
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


def _neighbours(sig: np.ndarray, threshold: float, texts: Sequence[str],
                pairs: Callable[[int], tuple[str, str]] | None,
                wanted: Callable[[int, int], bool]) -> dict[int, list[tuple[int, float]]]:
    """Every candidate pair ``(i, j)`` that ``wanted`` and that reaches the threshold, both ways."""
    bands, rows = choose_bands(sig.shape[1], threshold)
    neighbours: dict[int, list[tuple[int, float]]] = defaultdict(list)
    sets: dict[int, object] = {}
    for i, j in candidate_pairs(sig, bands, rows):
        if not wanted(i, j):
            continue
        if pairs is not None:
            si = sets.get(i) or sets.setdefault(i, _pair_sets(pairs(i)))
            sj = sets.get(j) or sets.setdefault(j, _pair_sets(pairs(j)))
            sim = _pair_sim(si, sj)
        else:
            si = sets.get(i) or sets.setdefault(i, shingle_set(texts[i]))
            sj = sets.get(j) or sets.setdefault(j, shingle_set(texts[j]))
            sim = jaccard(si, sj)
        if sim >= threshold:
            neighbours[i].append((j, sim))
            neighbours[j].append((i, sim))
    return neighbours


def held_out_overlaps(test_pairs: Sequence[tuple[str, str]], train_pairs: Sequence[tuple[str, str]],
                  threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, float]]:
    """``(test index, train index, similarity)`` of the closest training record of every test record that has
    one at ``threshold`` or above: the same measure and candidates as preparation's test-set check."""
    if not test_pairs or not train_pairs:
        return []
    both = list(test_pairs) + list(train_pairs)
    sig = MinHasher().signatures(a for _, a in both)
    n = len(test_pairs)
    neighbours = _neighbours(sig, threshold, [], lambda i: both[i], lambda i, j: i < n <= j)
    out = []
    for i in range(n):
        near = neighbours.get(i)
        if near:
            j, sim = max(near, key=lambda js: (js[1], -js[0]))
            out.append((i, j - n, round(sim, 4)))
    return out
