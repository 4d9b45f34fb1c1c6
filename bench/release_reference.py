"""Loop-form reimplementation of the authors' released S-CLIP loss (alinlab/s-clip).

Written from METHOD.md's description of the release, for parity tests and as the speed
baseline of ``bench/loss.py``: POT's ``ot.bregman.sinkhorn`` in float64 with 10
iterations, the plan not detached, and a Python loop over unpaired images for the keyword
loss (one host sync per image). The cost is cast to float64 before the POT call, the fix
any POT >= 0.9.7 user needs (the release passed a float32 cost with float64 marginals).
"""

from __future__ import annotations

import ot
import torch
import torch.nn.functional as F


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (-targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def release_ot_plan(query, support, logit_scale, num_iters: int = 10):
    cost = (1 - query @ support.T).double()
    reg = 1 / logit_scale
    n, m = cost.shape
    p = torch.ones(n, dtype=torch.double, device=cost.device) / n
    q = torch.ones(m, dtype=torch.double, device=cost.device) / m
    plan = ot.bregman.sinkhorn(p, q, cost, reg=reg, numItermax=num_iters)
    plan = plan / plan.sum(dim=1, keepdim=True)
    return plan.type_as(support)


def release_loss(
    image_features,
    text_features,
    logit_scale,
    query_features,
    keyword_features,
    keyword_labels,
) -> dict[str, torch.Tensor]:
    """The release's ``SemiSupervisedClipLoss(method="ours")`` on one process.

    keyword_labels: (B_p, K) bool/0-1, as in the release's ``keyword_labels[..., 0]``.
    """
    device = image_features.device
    losses = {}
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_query = logit_scale * query_features @ text_features.T
    logits_per_text = torch.cat([logits_per_image, logits_per_query]).T
    labels = torch.arange(image_features.shape[0], device=device)
    losses["contrastive_loss"] = (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2
    plan = release_ot_plan(query_features, image_features, logit_scale)
    pseudo_labels = plan @ F.one_hot(labels).float()
    losses["caption_loss"] = soft_ce(logits_per_query, pseudo_labels) / 2
    target = torch.zeros(len(query_features), len(keyword_features), device=device)
    for query_id, q in enumerate(query_features):
        sample_id = int(plan[query_id].max(dim=0)[1])
        candidates = keyword_labels[sample_id].nonzero().flatten().tolist()
        if len(candidates) > 0:
            if len(candidates) == 1:
                target[query_id, candidates[0]] = 1
            else:
                k = torch.stack([keyword_features[i] for i in candidates])
                sim = (q @ k.T * logit_scale).detach()
                prob = sim / sim.sum()
                for i in range(len(sim)):
                    target[query_id, candidates[i]] = prob[i]
    logits_kw = logit_scale * query_features @ keyword_features.T
    losses["keyword_loss"] = soft_ce(logits_kw, target) / 2
    return losses
