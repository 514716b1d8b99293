"""What an offline-world picture means, read without ``toy``: a small picture -> caption-words model.

The offline world's captions name animals (:data:`brainldm.offline.synthetic.ANIMALS`) told apart only by their coat's
fine pattern. :class:`CaptionWords` is a ridge map from hand-made picture features (a colour histogram, a coarse
thumbnail, and the greyscale picture's spectral energy by frequency band and orientation) to which animals the captions
name, fitted on the world's own pictures. It is the yardstick that does not depend on any trained model:

- it tells whether a world's meaning survives a blur to z's grid (:func:`blur_to_grid`): on the shipped world it
  names held-out pictures' animals far better from the originals than from the blurred pictures;
- it scores reconstructions by meaning: 2-way identification of the animals it reads in a reconstruction against
  those it reads in the presented picture (:func:`meaning_identification`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from brainldm.decoding.ridge import RidgeCV
from brainldm.metrics import correlation_matrix, pixcorr, pixel_vectors, two_way_identification
from brainldm.offline.synthetic import ANIMALS

ANALYSIS_SIZE = 128  # every picture is read at this size, whatever it was drawn or generated at
N_BANDS, N_ORIENTATIONS = 8, 8


def caption_words(captions: list[list[str]], words: tuple[str, ...] | None = None) -> np.ndarray:
    """(n, n_words) float32: 1 where any of an image's captions names the word (default: the world's animals)."""

    words = words or ANIMALS
    out = np.zeros((len(captions), len(words)), dtype=np.float32)
    for i, caps in enumerate(captions):
        text = " ".join(caps).lower()
        out[i] = [word in text for word in words]
    return out


def blur_to_grid(pictures: np.ndarray, grid: int) -> np.ndarray:
    """Pictures (n, H, W, 3) uint8 averaged over a ``grid`` x ``grid`` grid of cells and drawn back at (H, W)."""
    out = []
    for p in pictures:
        small = Image.fromarray(p).resize((grid, grid), Image.Resampling.BOX)
        out.append(np.asarray(small.resize(p.shape[1::-1], Image.Resampling.BILINEAR)))
    return np.stack(out)


def colour_histograms(pictures) -> np.ndarray:
    """(n, 64): the share of each picture's pixels in each of 4 x 4 x 4 RGB bins (at :data:`ANALYSIS_SIZE`)."""
    rows = []
    for p in pictures:
        p = np.asarray(p)
        if p.shape[:2] != (ANALYSIS_SIZE, ANALYSIS_SIZE):
            p = np.asarray(Image.fromarray(p).resize((ANALYSIS_SIZE,) * 2, Image.Resampling.BICUBIC))
        rows.append(np.histogramdd(p.reshape(-1, 3), bins=(4, 4, 4), range=[(0, 256)] * 3)[0].ravel())
    return np.stack(rows).astype(np.float32) / ANALYSIS_SIZE**2


def picture_features(pictures: np.ndarray) -> np.ndarray:
    """(n, 64 + 192 + 64) float32: colour histogram, 8 x 8 thumbnail and log spectral energy by band and orientation.

    ``pictures``: (n, H, W, 3) uint8, read at :data:`ANALYSIS_SIZE`.
    """
    size = ANALYSIS_SIZE
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    radius = np.hypot(fx, fy)
    band = np.digitize(radius, np.geomspace(1 / size, 0.5, N_BANDS + 1)[1:-1])
    orientation = ((np.arctan2(fy, fx) % np.pi) / np.pi * N_ORIENTATIONS).astype(int) % N_ORIENTATIONS
    cell = (band * N_ORIENTATIONS + orientation).ravel()
    keep = (radius.ravel() >= 1 / size) & (radius.ravel() <= 0.5)  # no DC, no corners past Nyquist
    counts = np.bincount(cell[keep], minlength=N_BANDS * N_ORIENTATIONS)
    rows = []
    for p in pictures:
        p = np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        histogram = colour_histograms([p.astype(np.uint8)])[0]
        thumbnail = np.asarray(Image.fromarray(p.astype(np.uint8)).resize((8, 8), Image.Resampling.BOX)).ravel()
        grey = p.mean(-1)
        power = np.abs(np.fft.fft2(grey - grey.mean())).ravel() ** 2
        energy = np.bincount(cell[keep], weights=power[keep], minlength=N_BANDS * N_ORIENTATIONS)
        rows.append(np.concatenate([histogram, thumbnail / 255.0, np.log1p(energy / np.maximum(counts, 1))]))
    return np.stack(rows).astype(np.float32)


class CaptionWords:
    """Ridge from :func:`picture_features` to caption words, fitted on pictures and their captions.

    Attributes (after ``fit``): ``words_`` the words read, ``mean_`` and ``scale_`` of the features,
    ``ridge_`` the fitted :class:`~brainldm.decoding.ridge.RidgeCV`.
    """

    def __init__(self, words: tuple[str, ...] | None = None, alphas=tuple(10.0**k for k in range(-2, 5))):
        self.words = words
        self.alphas = alphas

    def fit(self, pictures: np.ndarray, captions: list[list[str]]) -> CaptionWords:

        self.words_ = tuple(self.words or ANIMALS)
        X = picture_features(pictures)
        self.mean_, self.scale_ = X.mean(0), X.std(0) + 1e-6
        self.ridge_ = RidgeCV(alphas=self.alphas, device="cpu").fit(
            (X - self.mean_) / self.scale_, caption_words(captions, self.words_)
        )
        return self

    def predict(self, pictures: np.ndarray) -> np.ndarray:
        """(n, n_words): how strongly each picture shows each word."""
        X = (picture_features(pictures) - self.mean_) / self.scale_
        return np.asarray(self.ridge_.predict(X), dtype=np.float32)


def meaning_identification(reader: CaptionWords, reconstructions: np.ndarray, originals: np.ndarray) -> float:
    """2-way identification (chance 0.5) of each reconstruction's words, as ``reader`` reads them, among the
    originals' words read the same way. Pictures are (n, H, W, 3) uint8 of any size."""
    return float(two_way_identification(reader.predict(reconstructions), reader.predict(originals)).mean())


def reconstruction_scores(images, pictures, reader: CaptionWords, clip=None) -> dict[str, float]:
    """What reconstructions ``images`` carry of the presented ``pictures`` (both (n, H, W, 3) uint8, in the same
    order), as 2-way identification among the n (chance 0.5): ``pixels`` (64-px pixels), ``colour`` (colour
    histograms), ``words`` (the animals ``reader`` sees) and, given a CLIP extractor, ``clip``; and ``pixcorr``."""

    images, pictures = [np.asarray(i) for i in images], [np.asarray(p) for p in pictures]
    pairs = {"pixels": pixel_vectors, "colour": colour_histograms, **({"clip": clip} if clip else {})}
    out = {name: float(two_way_identification(f(images), f(pictures)).mean()) for name, f in pairs.items()}
    out["words"] = meaning_identification(reader, np.stack(images), np.stack(pictures))
    out["pixcorr"] = float(np.mean([pixcorr(a, b) for a, b in zip(images, pictures)]))
    return out


def mean_pairwise_correlation(images) -> float:
    """The mean pixel correlation (64 px) between different images: how alike a set of pictures is."""

    r = correlation_matrix(*(pixel_vectors(images),) * 2)
    return float(r[~np.eye(len(r), dtype=bool)].mean())
