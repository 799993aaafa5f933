"""A backend with the network taken out, for measuring everything around it."""

from __future__ import annotations

import numpy as np

from pipeline.backends.base import as_uint8


def short_crack(size_px: int = 400, length_px: int = 120, width_px: int = 5) -> np.ndarray:
    """A chip's probability (uint8) with one short crack across its centre, 0 elsewhere.

    Chips overlap by less than a third of their size, so the cracks of
    neighbouring chips never touch: a scene of them has one crack per chip,
    about as many as a cracked road, where a pattern reaching the chip edges
    would make one lattice of cracks over the whole scene.

    >>> p = short_crack(); p.dtype, p.shape, int(p[200, 200]), int(p[200, 10]), int(p.sum() // 255)
    (dtype('uint8'), (400, 400), 255, 0, 600)
    """
    p = np.zeros((size_px, size_px), np.uint8)
    top, left = (size_px - width_px) // 2, (size_px - length_px) // 2
    p[top : top + width_px, left : left + length_px] = 255
    return p


class FixedBackend:
    """Returns one fixed chip probability for every chip, at no cost: the network taken out.

    For measuring everything around the network (reading, stitching, vectorizing,
    the probability COG): a batch's result is a read-only broadcast view of the
    one chip, so no time goes into computing or even copying it.  The default
    chip holds one short crack (``short_crack``), so vectorizing and measuring
    have one crack per chip to do.
    """

    name = "fixed"

    def __init__(self, probability: np.ndarray | None = None, batch_size: int = 8) -> None:
        self.probability = short_crack() if probability is None else as_uint8(probability)
        self.batch_size = batch_size

    def predict(self, chips: np.ndarray) -> np.ndarray:
        if chips.shape[2:] != self.probability.shape:
            raise ValueError(
                f"chips of {chips.shape[2:]} px, but the fixed probability is {self.probability.shape} px"
            )
        return np.broadcast_to(self.probability, (len(chips), *self.probability.shape))
