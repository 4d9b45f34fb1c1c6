"""Single-process port of the SemiCLIP release's loss arithmetic, for parity tests (issue 23).

Release: github.com/Gank0078/SemiCLIP at commit 0e550063ab2ec31ba4173f176212d442ad3b4c90
(2025-02-06, "SemiCLIP"; the only other commit is the initial one). Read with
``git show HEAD:<path>``; every ``file:line`` below is at that commit. This file is written
from that reading, not copied; it is the SemiCLIP analogue of ``bench/release_reference.py``.
The working note for the implementer is ``docs/semiclip_release_notes.md``.

What each function mirrors
--------------------------
soft_cross_entropy             custom/loss.py:309-311  (-t * log_softmax).sum(1).mean(); the
                               ``weight`` argument is always 1 in the release.
clip_contrastive_loss          custom/loss.py:203-209 (stage 1) and 218-225 (stage 2): global
                               X, T only (no unpaired negatives, unlike S-CLIP), labels arange,
                               (CE_i2t + CE_t2i) / 2 * wcon (wcon = 1, custom/params.py:485).
concept_logits                 custom/model.py:271 (paired: logits_l), :276 (strong unpaired view:
                               logits_s), main.py:544/547 (weak unpaired view, stage-1 save):
                               exp(c) * F @ E^T, c = ``nouns_logit_scale`` (raw, never clamped:
                               custom/train.py:241 clamps only CLIP's logit_scale), E =
                               ``nouns_emb`` (never re-normalised after initialisation).
normalised_multi_hot           custom/loss.py:212: y / (y + 1e-8).sum(1): the 1e-8 is added to
                               every one of the K entries BEFORE the sum, so the denominator is
                               sum(y) + K * 1e-8 and an all-zero row stays all-zero.
stage1_losses                  custom/loss.py:202-213 (keys "contrastive_loss", "soft_loss"):
                               soft CE of logits_l / Tr (Tr = 1, custom/params.py:504) against
                               the normalised multi-hot, mean over ALL B_p rows (rows without a
                               noun add 0 but count in the mean), times cylam1 (= 1).
topk_uniform_targets           custom/loss.py:227-231: softmax(logits_w) -> topk(k=3) of the
                               (detached) probabilities -> one_hot summed -> divided by
                               (onehot + 1e-8).sum(1) = k + K * 1e-8.
select_surrogates              custom/loss.py:234-238: sim_j = <T~_j, Uw_j> (features are unit
                               vectors, so cosine), selk = int(B_u * pratio) over the GATHERED
                               unpaired batch, boolean mask of torch.topk(sim, selk) positions
                               (so the selected rows keep their batch order, not score order).
trapezoid_losses               custom/loss.py:242-251: ZI = [X; Uw[mask]], ZT = [T; T~[mask]];
                               logits are formed WITH s, squared, mean over (N x N), N = B_p +
                               selk, then / (s * s) * bs * cylam (bs = gathered B_p, loss.py:216).
stage2_losses                  custom/loss.py:215-251 (keys "contrastive_loss", "softu_loss",
                               "inmodal_cyclic_loss", "crossmodal_cyclic_loss"; addinfo
                               "mask_num"). No concept loss on paired images in stage 2.
surrogate_token_ids            custom/model.py:101-104 and 281-283: prompt "a photo includes X"
                               x4, X = BPE id 343 (hard-coded), replaced by the FIRST BPE token
                               of each of the top-4 concepts (topk of the raw saved logits, in
                               descending order; ``words`` is hard-coded to 4 at model.py:100,
                               --words is ignored). Token ids of the noun: main.py:314-317.
surrogate_input_embeddings     custom/model.py:284-285: token_embedding(ids) then the 12 context
                               positions [1,2,3, 5,6,7, 9,10,11, 13,14,15] overwritten by the
                               learnable context (model.py:103). Layout (CLIP BPE, ViT-B/16):
                               0 SOT | 1-3 ctx | 4 N1 | 5-7 ctx | 8 N2 | 9-11 ctx | 12 N3 |
                               13-15 ctx | 16 N4 | 17 EOT | 18.. pad 0.  Interleaved, NOT
                               "a photo includes N1 N2 N3 N4".
init_context                   custom/model.py:105-108: rows 1..3 ("a", "photo", "includes") of
                               the token embedding of the prompt, repeated 4 times -> (12, W).
                               Built at model construction, i.e. from the PRETRAINED token
                               embedding, before the stage-1 checkpoint is loaded (main.py:281
                               vs 387-398); the checkpoint has no ``nouns_xs`` so it stays so.
encode_text_from_embeddings    custom/model.py:212-233 (``encode_peft_text`` with ``xs``): x = xs
                               (+ positional embedding), transformer, ln_final, pool at
                               argmax(token ids) = EOT (model.py:43), projection, L2-normalise.
                               The release permutes NLD->LND around the transformer
                               (model.py:221-223), correct only for open_clip < 2.26; here the
                               permute is done only when the transformer is sequence-first.
concept_embedding_prompts      main.py:86-96 (and the unused copy custom/train.py:21-34):
                               "a photo includes {noun}." with "_" -> " ", encoded without
                               gradient, L2-normalised (twice), wrapped as nn.Parameter (main.py:309).
mine_concepts                  custom/data.py:764-804 (loops as the release loops) with the
                               75-word list data.py:26-33 and the isolation re-tag data.py:36-38.
concept_multi_hot              custom/data.py:805-825 and the label tensor data.py:514-531.
stage1_logit_table             main.py:520-558: weak (random train-transform) view, eval mode,
                               no autocast, batches of 32, dict {dataset index: (K,) float32}.
lookup_saved_logits            custom/train.py:131-136.
release_param_groups           main.py:353-376 (names with "module." under DDP change groups).
release_lr                     training/scheduler.py:9-10, 56-72 (per-group warm-up + cosine).

Quirks reproduced (each also in docs/semiclip_release_notes.md)
---------------------------------------------------------------
* s is multiplied in and divided out (loss.py:244-251): mathematically s-free, numerically not
  quite (fp16 under AMP in the release); gradient w.r.t. s is ~0, not exactly 0.
* The trapezoid terms are scaled by the GATHERED paired count bs (loss.py:216, 247, 251): with
  4 GPUs x 32 pairs the weight is 128, and mean() divides by N^2 = (B_p + selk)^2.
* Selection runs on the gathered unpaired batch: selk = int(128 * 0.3) = 38 in the scripts.
* The 1e-8 smoothing in both normalisations is per entry (K * 1e-8 in the denominator).
* Q uses topk of softmax(logits_w); the surrogate uses topk of logits_w itself (model.py:281):
  same order unless probabilities underflow to equal values (ties among exact zeros).
* c (concept scale) is exponentiated and never clamped.
* Concept rows whose nouns differ only by case are separate concepts ("Lots" vs "lots"), while
  CLIP's tokenizer lower-cases, so they start with identical E rows and identical first tokens.

No Lightning import. numpy and torch only; open_clip only in the optional self-check part.
Run ``python bench/semiclip_reference.py`` for the self-check (prints every term).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RELEASE_REPO = "Gank0078/SemiCLIP"
RELEASE_COMMIT = "0e550063ab2ec31ba4173f176212d442ad3b4c90"

# custom/data.py:26-33 -- data, copied as data (75 entries, case-sensitive, no duplicates;
# SEMICLIP.md calls it a 70-word list).
# fmt: off
OOD_NOUNS: tuple[str, ...] = (
    "lot", "zone", "top", "left", "inspection", "way", "brand", "hand", "length", "b", "ease",
    "communications", "economy", "number", "lies", "towards", "type", "places", "shapes", "Lots",
    "structure", "sizes", "pieces", "stands", "end", "built", "thirds", "zones", "bottom", "south",
    "prints", "air", "take-off", "types", "tens", "fact", "kind", "style", "side", "question",
    "situation", "y", "tp", "others", "styles", "amount", "drop", "holiday", "differnet", "size",
    "u", "pictures", "use", "l", "picture", "looks", "rate", "design", "s", "uses", "arrange",
    "z", "piece", "palyground", "lots", "view", "kinds", "j", "work", "beautiful", "R", "none",
    "lack", "]", "colourful",
)
# fmt: on
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")  # data.py:38, 782, 789

CONCEPT_PROMPT = "a photo includes {}."  # main.py:87 (also loss.py:128, unused there)
SURROGATE_PROMPT = "a photo includes X a photo includes X a photo includes X a photo includes X"
CLIP_X_TOKEN = 343  # model.py:104: CLIP BPE id of "x</w>" (the tokenizer lower-cases "X")
CONTEXT_POSITIONS = (1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15)  # model.py:103
SURROGATE_WORDS = 4  # model.py:100 (hard-coded; --words ignored)

# Defaults of the released scripts / argparse (custom/params.py, scripts/train_rs_stage*.sh)
TOPK = 3  # params.py:546 (--topk)
PRATIO = 0.3  # params.py:629, scripts pass --pratio 0.3
CMIN = 5  # params.py:543 (--cmin)
TR = 1.0  # params.py:504 (--Tr)
CYLAM = 1.0  # params.py:496-498 (--cylam1/2/3)
WCON = 1.0  # params.py:485 (--wcon)


# --------------------------------------------------------------------------- loss pieces
def soft_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, weight: Any = 1.0):
    """loss.py:309-311: per-element -t*log_softmax, times weight, summed per row, mean of rows."""
    per_element = -targets * F.log_softmax(outputs, dim=1)
    return (per_element * weight).sum(dim=1).mean()


def clip_contrastive_loss(image_features, text_features, logit_scale, wcon: float = WCON):
    """loss.py:203-209 / 218-225: symmetric InfoNCE over the (gathered) pairs only."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logits_per_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return (
        (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
        / 2
        * wcon
    )


def concept_logits(features, concept_emb, concept_log_scale):
    """model.py:271/276, main.py:544: exp(c) * F @ E^T (c is the raw parameter, no clamp)."""
    return concept_log_scale.exp() * features @ concept_emb.T


def normalised_multi_hot(nlabels):
    """loss.py:212: y / sum_k(y_k + 1e-8) (zero rows stay zero)."""
    return nlabels / (nlabels + 1e-8).sum(dim=1).unsqueeze(1)


def stage1_losses(
    image_features,
    text_features,
    logit_scale,
    concept_emb,
    concept_log_scale,
    nlabels,
    *,
    Tr: float = TR,
    cylam1: float = CYLAM,
    wcon: float = WCON,
) -> dict[str, torch.Tensor]:
    """Stage 1 (loss.py:202-213), on the gathered batch of one process.

    image_features, text_features: (B_p, D) unit rows (paired X, T).
    logit_scale: s = exp(CLIP logit_scale), already clamped to <= 100 by the train loop.
    concept_emb: E (K, D); concept_log_scale: c (scalar parameter, exponentiated here).
    nlabels: y (B_p, K) 0/1 multi-hot, rows of zeros for images without a kept noun.
    """
    losses = {
        "contrastive_loss": clip_contrastive_loss(image_features, text_features, logit_scale, wcon)
    }
    logits_l = concept_logits(image_features, concept_emb, concept_log_scale)
    if logits_l is not None:  # loss.py:211: always true for semiclip
        targets = normalised_multi_hot(nlabels)
        losses["soft_loss"] = soft_cross_entropy(logits_l / Tr, targets) * cylam1
    return losses


def topk_uniform_targets(logits_w, num_classes: int, topk: int = TOPK):
    """loss.py:227-231: uniform 1/(k + K*1e-8) on the top-k concepts of softmax(logits_w)."""
    probs_w = F.softmax(logits_w, dim=1)
    _, pseu_idxs = torch.topk(probs_w.detach(), topk, dim=1)
    onehot = F.one_hot(pseu_idxs, num_classes=num_classes).sum(dim=1)  # int64, (B_u, K)
    return onehot / (onehot + 1e-8).sum(dim=1).unsqueeze(1)


def select_surrogates(qtext_pseu_features, query_features, pratio: float = PRATIO):
    """loss.py:234-238: bool mask of the int(B_u * pratio) highest <T~_j, Uw_j>."""
    sim = (qtext_pseu_features * query_features).sum(dim=1)
    selk = int(query_features.shape[0] * pratio)
    _, topkpos = torch.topk(sim, k=selk)
    mask = torch.zeros_like(sim, dtype=torch.bool)
    mask[topkpos] = True
    return mask, sim


def trapezoid_losses(
    image_features,
    text_features,
    query_features,
    qtext_pseu_features,
    mask,
    logit_scale,
    *,
    bs: int | None = None,
    cylam2: float = CYLAM,
    cylam3: float = CYLAM,
) -> dict[str, torch.Tensor]:
    """loss.py:242-251, with the release's order: s in, square, mean, / s^2, * bs, * lambda.

    bs defaults to image_features.shape[0], the GATHERED paired count (loss.py:216).
    """
    if bs is None:
        bs = image_features.shape[0]
    image_mix = torch.cat((image_features, query_features[mask]))
    text_mix = torch.cat((text_features, qtext_pseu_features[mask]))
    logits_image_per_image = logit_scale * image_mix @ image_mix.t()
    logits_text_per_text = logit_scale * text_mix @ text_mix.t()
    inmodal = (
        (logits_image_per_image - logits_text_per_text).square().mean()
        / (logit_scale * logit_scale)
        * bs
        * cylam2
    )
    logits_per_image1 = logit_scale * image_mix @ text_mix.T
    logits_per_text1 = logits_per_image1.T
    crossmodal = (
        (logits_per_image1 - logits_per_text1).square().mean()
        / (logit_scale * logit_scale)
        * bs
        * cylam3
    )
    return {"inmodal_cyclic_loss": inmodal, "crossmodal_cyclic_loss": crossmodal}


def stage2_losses(
    image_features,
    text_features,
    logit_scale,
    query_features,
    query_features_strong,
    concept_emb,
    concept_log_scale,
    logits_w,
    qtext_pseu_features,
    *,
    topk: int = TOPK,
    pratio: float = PRATIO,
    bs: int | None = None,
    Tr: float = TR,
    cylam1: float = CYLAM,
    cylam2: float = CYLAM,
    cylam3: float = CYLAM,
    wcon: float = WCON,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stage 2 (loss.py:215-251), on the gathered batch of one process.

    query_features: Uw (B_u, D) weak view; query_features_strong: Us (B_u, D) strong view.
    logits_w: (B_u, K) stage-1 concept logits of these unpaired images, looked up from the
        saved table (fixed for the whole stage, no gradient).
    qtext_pseu_features: T~ (B_u, D) unit surrogate caption features (gradient into the
        context and the text tower).
    Returns (losses, addinfo) like the release's ``output_dict=True`` path.
    """
    losses: dict[str, torch.Tensor] = {}
    addinfo: dict[str, torch.Tensor] = {}
    if bs is None:
        bs = image_features.shape[0]
    losses["contrastive_loss"] = clip_contrastive_loss(
        image_features, text_features, logit_scale, wcon
    )

    logits_s = concept_logits(query_features_strong, concept_emb, concept_log_scale)
    pseu_ot = topk_uniform_targets(logits_w, logits_s.shape[1], topk)
    losses["softu_loss"] = soft_cross_entropy(logits_s / Tr, pseu_ot) * cylam1

    mask, _ = select_surrogates(qtext_pseu_features, query_features, pratio)
    addinfo["mask_num"] = torch.sum(mask)
    losses.update(
        trapezoid_losses(
            image_features,
            text_features,
            query_features,
            qtext_pseu_features,
            mask,
            logit_scale,
            bs=bs,
            cylam2=cylam2,
            cylam3=cylam3,
        )
    )
    return losses, addinfo


# ----------------------------------------------------------- surrogate captions (model)
def noun_first_tokens(tokenize: Callable[[str], torch.Tensor], nouns: Sequence[str]):
    """main.py:314-317: tokenizer(noun)[0, 1] -- the first BPE token of the bare noun."""
    return torch.cat([tokenize(word)[0, 1].unsqueeze(0) for word in nouns])


def surrogate_prompt_ids(tokenize: Callable[[str], torch.Tensor]):
    """model.py:101-104: (1, L) ids of the prompt and the X positions (id 343)."""
    ids = tokenize(SURROGATE_PROMPT)
    xs_idx = torch.where(ids[0] == CLIP_X_TOKEN)[0].tolist()
    return ids, xs_idx


def init_context(token_embedding_weight, prompt_ids, words: int = SURROGATE_WORDS):
    """model.py:105-108: embeddings of positions 1..3 ("a photo includes"), repeated 4x."""
    initw = F.embedding(prompt_ids[0], token_embedding_weight).detach()[1:4]
    return initw.repeat(words, 1).clone()  # (3 * words, W)


def surrogate_token_ids(prompt_ids, xs_idx, nouns_tokens, logits_w, words: int = SURROGATE_WORDS):
    """model.py:281-283: top-`words` concepts of the raw logits put in the X slots."""
    _, topk_idx = torch.topk(logits_w.detach(), words, dim=1)
    ids = prompt_ids.repeat(len(logits_w), 1)
    ids[:, xs_idx] = nouns_tokens[topk_idx]
    return ids


def surrogate_input_embeddings(token_embedding_weight, ids, context, positions=CONTEXT_POSITIONS):
    """model.py:284-285: token embeddings with the 12 context slots replaced by `context`."""
    emb = F.embedding(ids, token_embedding_weight)
    emb[:, list(positions)] = context  # in-place on a fresh tensor; gradient flows to context
    return emb


def encode_text_from_embeddings(clip_model: Any, ids, embeds, normalize: bool = True):
    """model.py:212-233 with xs: run an open_clip CLIP text tower on input embeddings.

    Duck-typed on open_clip.CLIP (transformer, positional_embedding, attn_mask, ln_final,
    text_projection, text_pool_type). The release always permutes NLD->LND
    (model.py:221-223); that was right for open_clip 2.23/2.24 only. Here the permute happens
    only for open_clip <= 2.24 (no ``batch_first`` attribute): from 2.26 the transformer takes
    (B, L, W) whatever ``batch_first`` says and transposes inside.
    """
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = embeds + clip_model.positional_embedding.to(cast_dtype)  # xs is NOT cast (model.py:216)
    # open_clip >= 2.26 takes (B, L, W) whatever batch_first says (it transposes inside);
    # only older versions (no batch_first attribute) want the release's (L, B, W)
    seq_first = not hasattr(clip_model.transformer, "batch_first")
    if seq_first:
        x = x.permute(1, 0, 2)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    if seq_first:
        x = x.permute(1, 0, 2)
    x = clip_model.ln_final(x)
    assert clip_model.text_pool_type == "argmax"  # model.py:226 -> :43 for CLIP text towers
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    proj = clip_model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def concept_embedding_prompts(nouns: Sequence[str]) -> list[str]:
    """main.py:87-88: the prompt texts whose text features initialise E."""
    return [CONCEPT_PROMPT.format(c.replace("_", " ")) for c in nouns]


# ----------------------------------------------------------------- concepts (data)
def mine_concepts(
    captions_per_image: Sequence[str | Sequence[str]],
    word_tokenize: Callable[[str], list[str]],
    pos_tag: Callable[[list[str]], list[tuple[str, str]]],
    *,
    cmin: int = CMIN,
    ood: Iterable[str] = OOD_NOUNS,
) -> tuple[list[str], list[list[str]]]:
    """custom/data.py:770-804, looping as the release does.

    word_tokenize / pos_tag: stand-ins for nltk.word_tokenize / nltk.pos_tag (injected: NLTK
    and its tagger data are not dependencies here). Returns (concepts in first-occurrence
    order, the de-duplicated noun list of every paired image, in paired order).
    """
    ood = list(ood)
    nouns_list: list[list[str]] = [[] for _ in range(len(captions_per_image))]
    for i, texts in enumerate(captions_per_image):
        if isinstance(texts, str):  # data.py:778-783 (fashion: one string)
            texts = [texts]
        for text in texts:  # data.py:785-790: every caption of the image
            tagged = pos_tag(word_tokenize(text))
            nouns_list[i].extend(w for w, tag in tagged if tag in NOUN_TAGS)
        nouns_list[i] = list(dict.fromkeys(nouns_list[i]))  # data.py:792 (case kept)

    nouns = list(dict.fromkeys(w for sub in nouns_list for w in sub))  # data.py:794-795
    nouns = [w for w in nouns if pos_tag([w])[0][1] in NOUN_TAGS]  # data.py:796 + 36-38
    nouns = [w for w in nouns if w not in ood]  # data.py:797
    nouns_count = {w: 0 for w in nouns}  # data.py:798-802: images containing the noun
    for word_list in nouns_list:
        for w in word_list:
            if w in nouns:
                nouns_count[w] += 1
    vocab = len(nouns_count)  # data.py:804: the cap divides by this, not by #images
    nouns = [
        w for w in nouns if nouns_count[w] >= cmin and len(w) > 2 and nouns_count[w] / vocab < 0.3
    ]
    return nouns, nouns_list


def concept_multi_hot(nouns_list: Sequence[Sequence[str]], nouns: Sequence[str]) -> torch.Tensor:
    """data.py:809-816 (+ 525-528): y[i, nouns.index(w)] = 1 for every kept noun of image i."""
    y = torch.zeros(len(nouns_list), len(nouns))
    for i, word_list in enumerate(nouns_list):
        idxs = [nouns.index(w) for w in word_list if w in nouns]
        y[i, idxs] = 1.0
    return y


# ----------------------------------------------------------------- stage hand-over
def stage1_logit_table(
    weak_features, indices, concept_emb, concept_log_scale, batch_size: int = 32
):
    """main.py:520-558: {dataset index: exp(c) * Uw E^T row (K,) float32 numpy}.

    weak_features: (N_u, D) unit features of ONE weak (random train-transform) view per
    unpaired image, computed in eval mode without autocast; indices: (N_u,) dataset indices.
    """
    all_reps, all_idxs = [], []
    with torch.no_grad():
        for start in range(0, len(weak_features), batch_size):
            f = weak_features[start : start + batch_size]
            reps = concept_log_scale.exp() * f @ concept_emb.T
            all_reps.extend(r.detach().cpu().numpy() for r in reps)
            all_idxs.extend(np.asarray(ix) for ix in indices[start : start + batch_size])
    reps_arr, idxs_arr = np.stack(all_reps), np.stack(all_idxs)
    return {index: reps_arr[i] for i, index in enumerate(idxs_arr)}


def lookup_saved_logits(table, qidxs, device=None):
    """custom/train.py:131-136: stack the saved rows of this batch's unpaired indices."""
    rows = np.stack([table[idx] for idx in qidxs.tolist()])
    return torch.tensor(rows).to(device if device is not None else qidxs.device)


# ----------------------------------------------------------------- gathering (DDP)
def release_gather(per_rank: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """loss.py:315-349 with the scripts' flags (gather_with_grad=False, local_loss=False).

    Simulates what rank `rank` sees: every rank's tensor concatenated in rank order, only its
    own slice carrying gradient (dist.all_gather has no autograd; loss.py:348 puts the local
    tensor back). Each rank then computes the whole global loss; DDP averages the parameter
    gradients, so the step follows (1 / world_size) * grad of the global loss.
    """
    return torch.cat([t if r == rank else t.detach() for r, t in enumerate(per_rank)], dim=0)


# ----------------------------------------------------------------- optimiser / schedule
def release_param_groups(named_parameters, lr: float, lr_add: float, wd: float):
    """main.py:353-376 (groups of AdamW). Pass DDP names ("module.…") to see the DDP grouping."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    def peft(n, p):
        return n.startswith("peft")

    def nouns(n, p):
        return n.startswith("nouns")

    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    return [
        {
            "name": "base",
            "weight_decay": 0.0,
            "lr": lr,
            "params": [n for n, p in named if exclude(n, p) and not nouns(n, p) and not peft(n, p)],
        },
        {
            "name": "base",
            "weight_decay": wd,
            "lr": lr,
            "params": [
                n for n, p in named if not exclude(n, p) and not nouns(n, p) and not peft(n, p)
            ],
        },
        {
            "name": "add",
            "weight_decay": wd,
            "lr": lr_add,
            "params": [n for n, p in named if nouns(n, p)],
        },
        {
            "name": "add",
            "weight_decay": wd,
            "lr": lr_add,
            "params": [n for n, p in named if peft(n, p)],
        },
    ]


def release_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """training/scheduler.py:9-10, 63-68 (applied per group with lr or lr_add)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, total_steps - warmup
    return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr


# ----------------------------------------------------------------------- self-check
def _unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _self_check() -> None:  # noqa: C901 - a script
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    bp, bu, k, d = 8, 10, 12, 16
    X, T, Uw, Us, Tt = (_unit(n, d, g=g) for n in (bp, bp, bu, bu, bu))
    E = _unit(k, d, g=g).requires_grad_(True)
    c = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    s = torch.tensor(100.0, dtype=torch.float64)
    y = (torch.rand(bp, k, generator=g, dtype=torch.float64) < 0.25).double()
    y[0] = 0  # an image without any kept noun
    logits_w = torch.randn(bu, k, generator=g, dtype=torch.float64) * 5

    l1 = stage1_losses(X, T, s, E, c, y)
    print("stage 1:", {n: round(v.item(), 6) for n, v in l1.items()})
    per_row = -(normalised_multi_hot(y) * F.log_softmax(concept_logits(X, E, c), 1)).sum(1)
    # the zero row adds 0 but counts in the mean
    assert per_row[0] == 0 and torch.allclose(per_row.mean(), l1["soft_loss"])
    assert torch.allclose(
        normalised_multi_hot(y).sum(1)[1:], (y.sum(1) / (y.sum(1) + k * 1e-8))[1:]
    )
    gE, gc = torch.autograd.grad(sum(l1.values()), [E, c])
    assert gE.abs().sum() > 0 and gc.abs() > 0

    l2, info = stage2_losses(X, T, s, Uw, Us, E, c, logits_w, Tt)
    print(
        "stage 2:",
        {n: round(v.item(), 6) for n, v in l2.items()},
        "mask_num",
        int(info["mask_num"]),
    )
    assert int(info["mask_num"]) == int(bu * PRATIO) == 3
    q = topk_uniform_targets(logits_w, k)
    assert ((q > 0).sum(1) == TOPK).all() and torch.allclose(
        q.sum(1), torch.full((bu,), 3 / (3 + k * 1e-8), dtype=q.dtype)
    )
    # closed form: bs * mean((ZI ZI^T - ZT ZT^T)^2), bs * mean((M - M^T)^2), M = ZI ZT^T
    mask, _ = select_surrogates(Tt, Uw)
    zi, zt = torch.cat([X, Uw[mask]]), torch.cat([T, Tt[mask]])
    m = zi @ zt.T
    assert torch.allclose(l2["inmodal_cyclic_loss"], bp * ((zi @ zi.T - zt @ zt.T) ** 2).mean())
    assert torch.allclose(l2["crossmodal_cyclic_loss"], bp * ((m - m.T) ** 2).mean())
    l2_s20, _ = stage2_losses(
        X, T, torch.tensor(20.0, dtype=torch.float64), Uw, Us, E, c, logits_w, Tt
    )
    for key in ("inmodal_cyclic_loss", "crossmodal_cyclic_loss"):  # s cancels
        assert torch.allclose(l2[key], l2_s20[key])
    # gathered-batch scaling: the same features with bs doubled double the trapezoid terms
    l2_bs, _ = stage2_losses(X, T, s, Uw, Us, E, c, logits_w, Tt, bs=2 * bp)
    assert torch.allclose(l2_bs["inmodal_cyclic_loss"], 2 * l2["inmodal_cyclic_loss"])

    # DDP: summing every rank's gradient (local slice only) gives the full gradient
    shards = [X[:4].clone().requires_grad_(True), X[4:].clone().requires_grad_(True)]
    per_rank = []
    for r in range(2):
        loss_r = sum(
            stage1_losses(release_gather(shards, r), T, s, E.detach(), c.detach(), y).values()
        )
        per_rank.append(torch.autograd.grad(loss_r, shards, allow_unused=True))
    xf = X.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(
        sum(stage1_losses(xf, T, s, E.detach(), c.detach(), y).values()), [xf]
    )
    assert per_rank[0][1] is None and per_rank[1][0] is None
    assert torch.allclose(torch.cat([per_rank[0][0], per_rank[1][1]]), full)

    # the project's soft CE has the release's reduction (mean over all rows)
    try:
        from sclip_lightning.losses.functional import soft_cross_entropy as project_sce

        z = concept_logits(X, E, c)
        t = normalised_multi_hot(y)
        assert torch.allclose(project_sce(z, t), soft_cross_entropy(z, t))
        print("sclip_lightning soft_cross_entropy agrees with loss.py:309-311")
    except ImportError:
        print("sclip_lightning not importable: soft CE cross-check skipped")

    # stage hand-over: table keyed by dataset index, lookup by batch indices
    idx = torch.tensor([103, 7, 55, 12, 9, 400, 31, 2, 88, 64])
    table = stage1_logit_table(Uw.float(), idx, E.float(), c.float())
    assert set(int(i) for i in table) == set(idx.tolist()) and table[55].dtype == np.float32
    got = lookup_saved_logits(table, idx[[2, 0]])
    assert torch.allclose(got, (c.exp() * Uw[[2, 0]] @ E.T).float(), atol=1e-5)

    # noun mining with a toy tagger (NLTK is not a dependency): case kept, isolation re-tag
    lexicon = {
        "river": "NN",
        "rivers": "NNS",
        "bridge": "NN",
        "Bridge": "NNP",
        "lots": "NNS",
        "trees": "NNS",
        "green": "JJ",
        "many": "JJ",
        "near": "IN",
        "a": "DT",
        "is": "VBZ",
        "cars": "NNS",
        "ok": "NN",
        "park": "VB",
    }

    def toy_tokenize(text):
        return text.replace(".", " .").split()

    def toy_tag(words):  # "park" is a noun in context (after "a"), a verb alone
        out = []
        for i, w in enumerate(words):
            tag = lexicon.get(w, ".")
            if w == "park" and i > 0 and words[i - 1] == "a":
                tag = "NN"
            out.append((w, tag))
        return out

    caps = (
        [["a river near a Bridge .", "many trees near a park ."]] * 6
        + [["lots of cars ok .", "a bridge ."]] * 5
        + [["green river ."]]
    )
    nouns, per_img = mine_concepts(caps, toy_tokenize, toy_tag)
    # 6 candidates survive the re-tag and the list; count / 6 < 0.3 needs count <= 1 < cmin
    print("toy concepts:", nouns)
    assert nouns == [] and "park" in per_img[0]
    nouns, per_img = mine_concepts(caps * 4, toy_tokenize, toy_tag, cmin=1)
    assert nouns == []  # every count / 6 >= 0.3 with 48 images: the cap empties the vocabulary
    caps_big = caps + [[f"a w{i} ."] for i in range(60)]
    lexicon.update({f"w{i}": "NN" for i in range(60)})
    nouns, per_img = mine_concepts(caps_big, toy_tokenize, toy_tag)
    print("toy concepts (60 extra rare nouns):", nouns)
    # out: "lots" (list), "park" (re-tag alone: VB), "ok" (length), the w_i (count < cmin)
    assert nouns == ["river", "Bridge", "trees", "cars", "bridge"]
    yk = concept_multi_hot(per_img, nouns)
    assert (
        yk.shape == (len(caps_big), 5) and yk[0].tolist() == [1, 1, 1, 0, 0] and yk[-1].sum() == 0
    )

    # optimiser groups: c in the "add" group with weight decay in one process, wd 0 under DDP
    shapes = {
        "clip.logit_scale": (),
        "clip.token_embedding.weight": (2, 2),
        "nouns_logit_scale": (),
        "nouns_emb": (3, 2),
        "nouns_xs": (12, 2),
    }
    named = [(n, torch.nn.Parameter(torch.zeros(sh))) for n, sh in shapes.items()]
    single = release_param_groups(named, 5e-5, 5e-5, 0.2)
    ddp = release_param_groups([("module." + n, p) for n, p in named], 5e-5, 5e-5, 0.2)
    assert "nouns_logit_scale" in single[2]["params"] and single[2]["weight_decay"] == 0.2
    assert "module.nouns_logit_scale" in ddp[0]["params"] and ddp[2]["params"] == []
    print("param groups (1 process):", [(gr["weight_decay"], gr["params"]) for gr in single])
    print("param groups (DDP):      ", [(gr["weight_decay"], gr["params"]) for gr in ddp])
    assert release_lr(0, 5e-5, 10, 100) == 5e-6 and abs(release_lr(100, 5e-5, 10, 100)) < 1e-20

    # surrogate captions through a tiny open_clip text tower (optional)
    try:
        import json
        from pathlib import Path

        import open_clip
    except ImportError:
        print("open_clip not importable: surrogate-caption check skipped")
        return
    cfg_path = (
        Path(__file__).resolve().parents[1] / "src/sclip_lightning/model_configs/sclip-tiny.json"
    )
    cfg = json.loads(cfg_path.read_text())
    clip = open_clip.CLIP(**cfg).eval()
    tok = open_clip.get_tokenizer("ViT-B-16", context_length=cfg["text_cfg"]["context_length"])
    ids, xs_idx = surrogate_prompt_ids(tok)
    assert xs_idx == [4, 8, 12, 16] and int(ids[0, 17]) == 49407
    concepts = ["river", "bridge", "storage tanks", "baseballfield", "trees", "cars"]
    ntok = noun_first_tokens(tok, concepts)
    ctx = init_context(clip.token_embedding.weight, ids).requires_grad_(True)
    assert ctx.shape == (12, cfg["text_cfg"]["width"])
    lw = torch.randn(3, len(concepts), generator=g).float()
    sids = surrogate_token_ids(ids, xs_idx, ntok, lw)
    emb = surrogate_input_embeddings(clip.token_embedding.weight, sids, ctx)
    tt = encode_text_from_embeddings(clip, sids, emb)
    # with the initial context, the embeddings path equals encoding the token ids themselves
    ref = clip.encode_text(sids, normalize=True)
    assert torch.allclose(tt, ref, atol=1e-5), (tt - ref).abs().max()
    print("surrogate ids row 0:", sids[0, :19].tolist())
    tt.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    print("self-check passed")


if __name__ == "__main__":
    _self_check()
