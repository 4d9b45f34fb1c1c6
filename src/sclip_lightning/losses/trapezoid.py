"""SemiCLIP's trapezoidal consistency: in-modal and cross-modal distance agreement.

Over the rows ``Z_I = [X; U_sel]`` (paired and selected unpaired images) and ``Z_T = [T;
T~_sel]`` (their captions and surrogate captions) the similarity structure of the two
modalities is made to agree (Gan & Wei, ICLR 2025, eqs. 5-6; release
``custom/loss.py:242-251``):

- in-modal: ``mean((Z_I Z_I^T - Z_T Z_T^T)^2)`` (image-image vs text-text similarities);
- cross-modal: ``mean((Z_I Z_T^T - Z_T Z_I^T)^2)`` (image->text vs text->image).

The release forms both with the CLIP scale ``s`` and divides by ``s^2`` afterwards; the value
is the same, so ``s`` is left out here (its gradient there is rounding noise).
"""

from __future__ import annotations

import torch


def trapezoid_losses(
    image_rows: torch.Tensor, text_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-modal and cross-modal consistency of matched rows.

    Args:
        image_rows: (N, D) unit image features ``Z_I``.
        text_rows: (N, D) unit caption features ``Z_T`` (row i describes image i).

    Returns:
        ``(in_modal, cross_modal)`` scalars, each a mean over the N x N entries.
    """
    if image_rows.shape != text_rows.shape:
        raise ValueError(
            f"image_rows and text_rows must have the same shape; got {tuple(image_rows.shape)} "
            f"and {tuple(text_rows.shape)}"
        )
    in_modal = (image_rows @ image_rows.T - text_rows @ text_rows.T).square().mean()
    cross = image_rows @ text_rows.T
    cross_modal = (cross - cross.T).square().mean()
    return in_modal, cross_modal
