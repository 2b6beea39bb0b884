"""Visual words over the stored local features: more candidates for verification, found by the keypoints themselves.

Verification looks at the best ``VERIFY_TOP`` images of the descriptor search; a copy whose global and regional
descriptors rank its original lower (DISC21-style chained edits: a crop, then a colour change, then a frame) is
never verified, however many keypoints it shares with it. Here every stored RootSIFT descriptor becomes a visual
word (Sivic & Zisserman 2003, "Video Google") of a two-level vocabulary tree (Nistér & Stewénius 2006): ``BRANCH``
centres learned by k-means on a sample of the database's own descriptors, then ``BRANCH`` centres inside each, so
``BRANCH ** 2`` words. An image is its bag of words, counts square-rooted (against bursts of one repeated texture:
Jégou, Douze & Schmid 2009) times the words' idf, L2-normalised; a query's bag scores every image through an
inverted file, and its best ``WORD_TOP`` images join the verification candidates (``copies.verified_ranking``).
Only verification decides: a word candidate that does not verify keeps the place its descriptors gave it, or none.

The vocabulary is learned from at most ``SAMPLE`` of the database's descriptors drawn with a fixed seed (``learned``),
so the same descriptors always give the same words. Learning it and giving every descriptor its word takes 1.1-1.3 s
for the 980 images of the copy-detection set (164 k descriptors), 3.2-3.4 s for 9,800-10,000 images, 5.2 s and ~190
MB more memory at its peak for 14,700 (one process, 2 cores). index.py does it for a database of at least
``STORED_FROM_IMAGES`` images and stores the vocabulary and the words in the file (``storage.copy_features``: every
version gets its own, learned on its descriptors); for a smaller database, or a file written before, it is done when
the database is first verified against (the server does it when it loads a version: ``web.live.warmed``), where it
costs less than the ~4 % it would add to indexing. The inverted file holds 6 bytes per (image, word) pair (14 MB at
14,700 images) and a query's word search takes 1.5-2.4 ms.

Measured on the copy-detection set (bench.chained_edits, the same indexes, evaluate.py; before -> after): chained
edits mAP 0.828 -> 0.845 (seed 0) and 0.883 -> 0.899 (seed 1), µAP 0.806 -> 0.823 and 0.824 -> 0.841; the
one-edit protocol unchanged (0.994, 0.989 mAP); all-vs-all 0.962 / 0.994 -> 0.962 / 0.992 (3 queries moved: 2 up,
1 down). Of the 23 chained queries of seed 0 whose original the descriptors ranked beyond the verified 100, the
word search puts 8 in its first 20 with this tree, 11 with a flat 4,096-centre k-means (faiss: 0.849 / 0.899 mAP,
but faiss is an optional extra and a flat k-means of that size is slow in numpy), 7 with 1,024 centres, 6 with
random-hyperplane hashing (4 tables of 14 bits: nothing to learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..descriptors.local_features import as_root_sift

BRANCH = 64  # centres per level: 4,096 words
SAMPLE = 50_000  # descriptors the vocabulary is learned on, at most
ITERATIONS = 8  # Lloyd iterations per k-means
SEED = 0
WORD_TOP = 20  # images of the word search verified beyond the descriptor search's best
BLOCK = 16_384  # descriptors assigned per batch, drawn at random (bounded memory: see ``learned``)
FAR = 1e3  # the coordinates of an unused centre: no unit vector is nearer to it than to a real one
STORED_FROM_IMAGES = 2_000  # index.py stores the words of a database at least this large (see the module docstring)


def nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, d), (k, d) float32 -> (n,) the index of each point's nearest centre (squared Euclidean)."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    return ((centres * centres).sum(axis=1)[None, :] - 2.0 * points @ centres.T).argmin(axis=1)


def lloyd(points: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """k-means (Lloyd, started from ``k`` of the points drawn at random) of (n, d) float32 -> (k, d) float32 centres; with
    ``k`` or fewer points the points themselves, the other centres at ``FAR``. An emptied cluster keeps its centre.
    Not ``descriptors.mop.kmeans`` (float64, k-means++ seeding, until convergence: the codebook stored with a MOP
    database): that took 3.7 s for the first level alone on 50,000 descriptors, this 0.6 s, and it runs at load."""
    centres = np.full((k, points.shape[1]), FAR, np.float32)
    if len(points) <= k:
        centres[: len(points)] = points
        return centres
    centres[:] = points[rng.choice(len(points), k, replace=False)]
    for _ in range(iterations):
        labels = nearest(points, centres)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0
        starts = np.cumsum(counts) - counts
        sums = np.add.reduceat(points[np.argsort(labels, kind="stable")], starts[filled])  # one row per filled cluster
        centres[filled] = sums / counts[filled, None]
    return centres


@dataclass(frozen=True)
class Vocabulary:
    """A two-level vocabulary tree: ``top`` (B, d) centres and ``children`` (B, B, d), word = top * B + child."""

    top: np.ndarray
    children: np.ndarray

    @property
    def size(self) -> int:
        return int(self.children.shape[0] * self.children.shape[1])

    @classmethod
    def learn(cls, points: np.ndarray, branch: int = BRANCH, iterations: int = ITERATIONS, seed: int = SEED) -> "Vocabulary":
        """Learn from (n, d) float32 points; deterministic for a given ``seed``."""
        rng = np.random.default_rng(seed)
        top = lloyd(points, branch, iterations, rng)
        labels = nearest(points, top)
        children = np.stack([lloyd(points[labels == j], branch, iterations, rng) for j in range(branch)])
        return cls(top, children)

    def words(self, points: np.ndarray) -> np.ndarray:
        """(n, d) float32 -> (n,) int64 words. The second level is one batched product: the points grouped by their
        first-level centre, each group padded to the largest."""
        branch = self.children.shape[1]
        first = nearest(points, self.top)
        if len(points) == 0:
            return first
        order = np.argsort(first, kind="stable")
        counts = np.bincount(first, minlength=branch)
        rank = np.arange(len(points)) - np.repeat(np.cumsum(counts) - counts, counts)  # place inside its group
        grouped = np.zeros((branch, counts.max(), points.shape[1]), np.float32)
        grouped[first[order], rank] = points[order]
        squared = (self.children * self.children).sum(axis=2)  # (B, B)
        distances = squared[:, None, :] - 2.0 * np.matmul(grouped, self.children.transpose(0, 2, 1))  # (B, max, B)
        second = np.empty(len(points), np.int64)
        second[order] = distances[first[order], rank].argmin(axis=1)
        return first * branch + second


class VisualWords:
    """The inverted file of a database's local features (see the module docstring)."""

    def __init__(self, vocabulary: Vocabulary, count: int, image: np.ndarray, word: np.ndarray, tf: np.ndarray):
        """``image``, ``word``, ``tf`` (P,): one posting per (image, word) pair with its count; ``count`` images."""
        self.vocabulary = vocabulary
        self.count = count
        size = vocabulary.size
        self.idf = np.log(count / np.maximum(np.bincount(word, minlength=size), 1)).astype(np.float32)
        weight = np.sqrt(tf).astype(np.float32) * self.idf[word]
        norms = np.sqrt(np.bincount(image, weights=weight * weight, minlength=count)).astype(np.float32)
        weight /= np.maximum(norms[image], np.float32(1e-12))
        by_word = np.argsort(word, kind="stable")
        self.image = image[by_word].astype(np.int32)
        self.weight = weight[by_word]
        self.starts = np.searchsorted(word[by_word], np.arange(size + 1))

    @classmethod
    def of(
        cls, descriptors: np.ndarray, keypoint_image: np.ndarray, count: int,
        vocabulary: Vocabulary | None = None, words: np.ndarray | None = None,
    ) -> "VisualWords | None":
        """From stored uint8 RootSIFT (K, 128) and their database rows (K,), ``count`` images; None without any.
        ``vocabulary`` and ``words`` (K,), stored with the database (``learned``), spare learning and assigning."""
        if len(descriptors) == 0:
            return None
        if vocabulary is None or words is None:
            vocabulary, words = learned(descriptors)
        pairs, tf = np.unique(np.asarray(keypoint_image, np.int64) * vocabulary.size + words, return_counts=True)
        return cls(vocabulary, count, pairs // vocabulary.size, pairs % vocabulary.size, tf)

    def scores(self, descriptors: np.ndarray) -> np.ndarray:
        """A query's uint8 RootSIFT (n, 128) -> (count,) float32 tf-idf cosine of its bag of words with every image's."""
        out = np.zeros(self.count, np.float32)
        if len(descriptors) == 0:
            return out
        words, tf = np.unique(self.vocabulary.words(as_root_sift(descriptors)), return_counts=True)
        weight = np.sqrt(tf).astype(np.float32) * self.idf[words]
        norm = float(np.linalg.norm(weight))
        if norm == 0.0:
            return out
        lengths = self.starts[words + 1] - self.starts[words]
        if lengths.sum() == 0:
            return out
        # the postings of every query word, in one gather: position = the word's start + the offset inside it
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        at = np.repeat(self.starts[words], lengths) + offsets
        contributions = self.weight[at] * np.repeat(weight / norm, lengths)
        return np.bincount(self.image[at], weights=contributions, minlength=self.count).astype(np.float32)

    def top(self, descriptors: np.ndarray, k: int = WORD_TOP) -> np.ndarray:
        """The rows of the ``k`` best-scoring images (score > 0), best first. (n, 128) uint8 -> (<= k,) int64."""
        scores = self.scores(descriptors)
        best = np.argsort(-scores, kind="stable")[:k]
        return best[scores[best] > 0].astype(np.int64)


def learned(descriptors: np.ndarray) -> tuple[Vocabulary, np.ndarray]:
    """Stored uint8 RootSIFT (K, 128), K >= 1 -> the vocabulary learned on at most ``SAMPLE`` of them (fixed seed) and
    every descriptor's word, int64 (K,)."""
    sample = descriptors
    if len(descriptors) > SAMPLE:
        sample = descriptors[np.sort(np.random.default_rng(SEED).choice(len(descriptors), SAMPLE, replace=False))]
    vocabulary = Vocabulary.learn(as_root_sift(sample))
    # blocks of descriptors drawn across the whole database, not of a few neighbouring images: their groups under the
    # first level are then about as even as k-means made them, and padding them (``Vocabulary.words``) costs little
    shuffled = np.random.default_rng(SEED).permutation(len(descriptors))
    words = np.empty(len(descriptors), np.int64)
    for start in range(0, len(descriptors), BLOCK):
        block = shuffled[start : start + BLOCK]
        words[block] = vocabulary.words(as_root_sift(descriptors[block]))
    return vocabulary, words
