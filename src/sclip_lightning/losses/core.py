"""The three S-CLIP terms (contrastive, caption-level OT, keyword PLL) as one autograd node.

:class:`SCLIPLoss` uses this for its main configuration (OT assigner over the paired
images); every other assigner goes through the composable path of ``sclip.py``. Both
compute the same numbers: the fused node only removes the autograd bookkeeping between
the pieces and shares their intermediate results:

- one product ``L^T = [X; U] (s Y)^T`` holds every caption logit (image->text and the
  unpaired images' caption logits in its rows, text->image in its columns; the unpaired
  block has the plan's layout, so the caption terms need no transposed passes);
- one row and one column log-softmax of ``L`` serve the three cross-entropies, forward
  and backward (the softmax the backward needs is their exponential, in place);
- the Sinkhorn plan comes from :func:`sinkhorn_forward` and its exact unrolled gradient
  from :func:`sinkhorn_backward` (low rank, float64);
- the backward runs exactly the matrix products the gradients need (``dL^T (s Y)``,
  ``dL [X; U]``, the cost's two and the keyword logits' two), the cost's and the keyword's
  accumulated in place into the unpaired and paired image gradients, and ``ds`` from dot
  products instead of extra ``B x B`` passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sclip_lightning.losses.functional import sinkhorn_backward, sinkhorn_forward
from sclip_lightning.losses.keyword_pll import keyword_loss_backward, keyword_loss_forward


@dataclass(frozen=True)
class CoreOptions:
    """What :class:`SCLIPCore` computes (the matching :class:`SCLIPLoss` options).

    num_iters, solver, reg: Sinkhorn iterations, ``"pot" | "log"``, fixed reg or None = 1/s.
    caption: compute the caption loss (else the plan only serves the keyword loss).
    negatives: unpaired images are extra text->image candidates (the release).
    plan_grad: back-propagate the caption loss through the plan (the release).
    keyword_weighting, keyword_empty_rows_in_mean: see :class:`KeywordPLLLoss`.
    weights: multipliers of the (contrastive, caption, keyword) outputs.
    """

    num_iters: int = 10
    solver: str = "pot"
    reg: float | None = None
    caption: bool = True
    negatives: bool = True
    plan_grad: bool = True
    keyword_weighting: str = "softmax"
    keyword_empty_rows_in_mean: bool = True
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)


class SCLIPCore(torch.autograd.Function):
    """Contrastive + caption-level OT + keyword losses, times ``options.weights``.

    ``apply(image, text, unpaired, keywords, candidates, scale, options)``:

    - image, text (B_p, D), unpaired (B_u, D) float32 with B_p, B_u >= 1; scale ``s`` 0-d;
    - keywords (K, D) with K >= 1 and candidates (B_p, K) bool, or both None (no keyword
      loss);
    - options: :class:`CoreOptions`.

    Returns ``(contrastive, caption, keyword)`` times ``options.weights``: the CLIP loss
    ``(CE_i2t + CE_t2i) / 2``, the soft cross-entropy of ``s U Y^T`` against ``Gamma`` (0 when
    ``options.caption`` is False) and the keyword partial-label loss (0 without keywords).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: torch.Tensor,
        text: torch.Tensor,
        unpaired: torch.Tensor,
        keywords: torch.Tensor | None,
        candidates: torch.Tensor | None,
        scale: torch.Tensor,
        options: CoreOptions,
    ):
        n_p, n_u = image.shape[0], unpaired.shape[0]
        n = n_p + n_u
        caption = options.caption
        scaled_text = text * scale
        # logits^T: row j = candidate image j against every caption, so the image->text and
        # caption losses (per image) are contiguous row reductions and the caption block
        # (rows B_p:) has Gamma's layout. Written block by block: no [X; U] copy.
        logits_t = image.new_empty(n, n_p)
        torch.mm(image, scaled_text.T, out=logits_t[:n_p])
        torch.mm(unpaired, scaled_text.T, out=logits_t[n_p:])
        # image -> text (paired rows) and the caption loss (unpaired rows): row log-softmax
        n_c = n if caption else n_p
        log_p_img = torch.log_softmax(logits_t[:n_c], dim=1)
        i2t = -log_p_img[:n_p].diagonal().mean()
        # text -> image: column log-softmax over the candidates (unpaired too: `negatives`)
        n_r = n if options.negatives else n_p
        log_p_txt = torch.log_softmax(logits_t[:n_r], dim=0)
        t2i = -log_p_txt.diagonal().mean()
        del logits_t
        # the plan over the paired images (its float32 copy reuses the cost's buffer)
        sim = unpaired @ image.T  # (B_u, B_p)
        reg = (1.0 / scale) if options.reg is None else options.reg
        gamma, gamma64, lus, lvs = sinkhorn_forward(
            torch.sub(1.0, sim), reg, options.num_iters, options.solver, overwrite_cost=True
        )
        cap = image.new_zeros(())
        gamma_sum = None
        if caption:  # mean_u of -sum_p Gamma_up log softmax_p(L_u)
            gamma_sum = gamma.sum(dim=1)
            cap = -torch.dot(gamma.view(-1), log_p_img[n_p:].reshape(-1)) / n_u
        kw = cap.new_zeros(())
        kw_saved: tuple[torch.Tensor, ...] = ()
        if keywords is not None:
            assert candidates is not None
            # candidate set of unpaired image u: the keywords of its heaviest paired caption
            nearest = gamma.max(dim=-1).indices
            kw, kw_saved = keyword_loss_forward(
                unpaired,
                keywords,
                scale,
                candidates[nearest],
                options.keyword_weighting,
                options.keyword_empty_rows_in_mean,
            )
        ctx.options = options
        ctx.sizes = (n_p, n_u, n_r, n_c, len(kw_saved))
        ctx.potentials = (lus, lvs)
        ctx.save_for_backward(
            image, text, unpaired, keywords, scale, scaled_text, log_p_img, log_p_txt, sim,
            gamma, gamma64, gamma_sum, *kw_saved,
        )  # fmt: skip
        w_con, w_cap, w_kw = options.weights
        return (t2i + i2t) * (w_con / 2), cap * w_cap, kw * w_kw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_con, g_cap, g_kw):  # type: ignore[override]
        (
            image, text, unpaired, keywords, scale, scaled_text, log_p_img, log_p_txt, sim,
            gamma, gamma64, gamma_sum, *kw_saved,
        ) = ctx.saved_tensors  # fmt: skip
        # Saved buffers are reused in place below (each fresh (B, B) buffer is one more pass
        # through memory); a second backward through the same graph therefore fails with
        # PyTorch's "modified by an inplace operation" error instead of giving wrong results.
        options: CoreOptions = ctx.options
        n_p, n_u, n_r, n_c, _ = ctx.sizes
        n = n_p + n_u
        caption = options.caption
        plan_grad = caption and options.plan_grad
        w_con, w_cap, w_kw = options.weights
        c_con = g_con * (w_con / (2 * n_p))  # each CE is a mean over B_p, the loss their average
        c_cap = g_cap * (w_cap / n_u)
        if plan_grad:
            # d loss / d Gamma = -log softmax(L_u) / B_u, float64 for the Sinkhorn, times
            # 1 / reg: the Sinkhorn backward is linear, so it returns d sim = dL_ot / reg
            # directly (L_ot = (sim - 1) / reg)
            reg = (1.0 / scale).double() if options.reg is None else options.reg
            d_gamma = log_p_img[n_p:].to(torch.float64).mul_(-c_cap.double() / reg)
        # dL^T = row softmax * its weight + column softmax * c_con - the targets
        row_coef = c_con.expand(n_c).clone()
        if caption:
            row_coef[n_p:] = gamma_sum * c_cap
        d_logits_t = log_p_img.exp_().mul_(row_coef.unsqueeze(1))
        if n_c < n:
            d_logits_t = torch.cat([d_logits_t, d_logits_t.new_zeros(n - n_c, n_p)])
        d_logits_t[:n_r].addcmul_(log_p_txt.exp_(), c_con)
        d_logits_t.diagonal().sub_(2 * c_con)
        if caption:
            d_logits_t[n_p:].addcmul_(gamma, c_cap, value=-1.0)
        # L^T = [X; U] (s Y)^T, block by block
        d_image = d_logits_t[:n_p] @ scaled_text
        d_unpaired = d_logits_t[n_p:] @ scaled_text
        d_scaled_text = d_logits_t[:n_p].T @ image
        d_scaled_text.addmm_(d_logits_t[n_p:].T, unpaired)
        d_scale = torch.dot(d_scaled_text.view(-1), text.reshape(-1))
        d_text = d_scaled_text.mul_(scale)
        if plan_grad:
            # caption loss -> Gamma -> (unrolled Sinkhorn) -> L_ot = -cost / reg, in float64
            cost = None if gamma64 is not None else torch.sub(1.0, sim)  # "log" rebuilds Gamma
            lus, lvs = ctx.potentials
            d_sim64 = sinkhorn_backward(cost, reg, gamma64, lus, lvs, d_gamma, grad_owned=True)
            d_sim = gamma.copy_(d_sim64)  # float32, in the plan's buffer
            if options.reg is None:  # L_ot = (sim - 1) s: ds += sum(dL_ot * (sim - 1))
                d_scale = d_scale + (torch.dot(d_sim.view(-1), sim.view(-1)) - d_sim.sum()) / scale
            d_image.addmm_(d_sim.T, unpaired)
            d_unpaired.addmm_(d_sim, image)
        d_keywords = None
        if kw_saved:  # keyword logits s U K^T
            d_kw_sim, d_kw_scale = keyword_loss_backward(g_kw * w_kw, scale, tuple(kw_saved))
            d_scale = d_scale + d_kw_scale
            d_unpaired.addmm_(d_kw_sim, keywords)
            d_keywords = d_kw_sim.T @ unpaired
        needs = ctx.needs_input_grad
        return (
            d_image if needs[0] else None,
            d_text if needs[1] else None,
            d_unpaired if needs[2] else None,
            d_keywords if needs[3] else None,
            None,
            d_scale.reshape(scale.shape) if needs[5] else None,
            None,
        )
