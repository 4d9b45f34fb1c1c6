"""Text towers run on token embeddings, some of them learned: SemiCLIP's surrogate captions.

:class:`PromptEncoder` runs a model's text tower from token embeddings instead of token ids,
so that some positions can hold learned vectors (prompt tuning). With the embeddings of the
ids themselves it equals ``model.encode_text(ids, normalize=True)``. Two kinds of text tower:

- open_clip's own CLIP text transformer (model ``CLIP``, e.g. ``sclip-tiny``): positional
  embeddings added, causal mask, ``ln_final``, pooled as the model pools (``text_pool_type``,
  the end-of-text token for CLIP), ``text_projection``;
- a Hugging Face tower (``CustomTextCLIP`` with open_clip's ``HFTextEncoder``, e.g. MiniLM in
  ``sclip-effnet-minilm``): raw word embeddings into ``transformer(inputs_embeds=...)`` (the
  HF model adds position / token-type embeddings and its embedding LayerNorm itself), then
  the tower's pooler over the attention mask and its projection.

:class:`SurrogatePrompts` builds SemiCLIP's surrogate captions (release
``Gank0078/SemiCLIP``, custom/model.py:98-108, 280-289; ``docs/semiclip_release_notes.md``
section 6): per image, ``words`` copies of a learned context, each followed by one of the
image's top concepts, ``[start] ctx..ctx <concept 1> ctx..ctx <concept 2> ... [end] pad``.
Token ids and positions come from the tokenizer (never hard-coded), so the layout holds for
CLIP BPE (SOT/EOT) and WordPiece ([CLS]/[SEP], words in several pieces) alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Tokenizer = Callable[[list[str]], torch.Tensor]


class PromptEncoder:
    """Run a model's text tower on token embeddings, some of them learned (open_clip CLIP
    transformer or HF tower).

    Build with :meth:`for_model`. The tokenizer's framing (the start and end tokens every
    tokenised text carries, the padding id, the context length L) is read from tokenising
    an empty and a one-word text.

    Attributes:
        model: the open_clip model (not copied: the encoder follows its weights).
        tokenizer: the open_clip tokenizer (texts -> (B, L) long).
        width: the token-embedding width W.
        context_length: L, the length of the tokenizer's rows.
        pad_id: the id the tokenizer pads with.
        prefix_exact: whether :meth:`encode` on the first n positions equals it on all L
            whenever every text ends within n (causal mask and end-token pooling; HF towers
            whose pooler reads the real tokens only), so callers may cut the padding.
        start_ids: the ids every text starts with (CLIP: [SOT]; BERT: [CLS]).
        end_ids: the ids every text ends with, before the padding (CLIP: [EOT]; BERT: [SEP]).
    """

    width: int
    prefix_exact: bool = False

    def __init__(self, model: Any, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        empty = tokenizer([""])
        self.context_length = int(empty.shape[1])
        if self.context_length < 3:
            raise ValueError(f"the tokenizer's context length is {self.context_length}")
        self.pad_id = int(empty[0, -1])
        frame = self._real(empty[0])
        probe = self._real(tokenizer(["a"])[0])
        k = 0
        while k < len(frame) and k < len(probe) and frame[k] == probe[k]:
            k += 1
        self.start_ids, self.end_ids = frame[:k], frame[k:]
        n_end = len(self.end_ids)
        if len(probe) <= len(frame) or probe[len(probe) - n_end :] != self.end_ids:
            raise ValueError(
                f"cannot tell this tokenizer's start and end tokens apart: '' -> {frame}, "
                f"'a' -> {probe}"
            )

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer) -> PromptEncoder:
        """The encoder for ``model``'s text tower.

        Args:
            model: an open_clip ``CLIP`` (own text transformer) or a ``CustomTextCLIP``
                whose ``text`` is an ``HFTextEncoder``.
            tokenizer: its open_clip tokenizer (texts -> (B, L) long).

        Raises:
            TypeError: another kind of text tower (e.g. ``CustomTextCLIP`` with open_clip's
                ``TextTransformer``, CoCa).
        """
        text = getattr(model, "text", None)
        if text is not None and all(hasattr(text, a) for a in ("transformer", "pooler", "proj")):
            return _HFPromptEncoder(model, tokenizer)
        if text is None and all(
            hasattr(model, a)
            for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ):
            return _CLIPPromptEncoder(model, tokenizer)
        raise TypeError(
            f"PromptEncoder supports open_clip CLIP text transformers and HFTextEncoder towers, "
            f"not {type(model).__name__} with text tower {type(text).__name__}"
        )

    def _real(self, row: torch.Tensor) -> list[int]:
        """The ids of one tokenised row up to its last non-padding id."""
        ids = row.tolist()
        n = len(ids)
        while n > 0 and ids[n - 1] == self.pad_id:
            n -= 1
        return ids[:n]

    @property
    def device(self) -> torch.device:
        """The device of the token-embedding table."""
        return self._table().weight.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenise ``texts`` as the model's own text path expects.

        Args:
            texts: B texts.

        Returns:
            (B, L) long ids on the model's device.
        """
        return self.tokenizer(list(texts)).to(self.device)

    def word_tokens(self, words: Sequence[str]) -> list[list[int]]:
        """The sub-token ids of each bare word (no start, end or padding ids).

        A "word" may be a phrase ("parking lot"): its ids as the tokenizer gives them between
        the start and end tokens. A word that tokenises to nothing gives ``[]``.

        Raises:
            ValueError: a word fills the whole context (it was truncated).
        """
        rows = self.tokenizer(list(words)) if len(words) else torch.empty(0, 0)
        out = []
        s, e = len(self.start_ids), len(self.end_ids)
        for word, row in zip(words, rows, strict=True):
            ids = self._real(row)
            if len(ids) >= self.context_length:
                raise ValueError(
                    f"{word!r} fills the tokenizer's whole context ({self.context_length} tokens)"
                )
            if ids[:s] != self.start_ids or ids[len(ids) - e :] != self.end_ids:
                raise ValueError(
                    f"{word!r} -> {ids}: not framed by {self.start_ids}, {self.end_ids}"
                )
            out.append(ids[s : len(ids) - e])
        return out

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Look ``ids`` up in the model's token-embedding table.

        Args:
            ids: (B, L) long token ids.

        Returns:
            (B, L, W) embeddings in the table's dtype; differentiable into the table.
        """
        return self._table()(ids)

    def encode(
        self, ids: torch.Tensor, embeds: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Run the text tower from ``embeds`` (``ids`` give the padding / pooled positions).

        ``encode(ids, token_embeddings(ids))`` equals ``model.encode_text(ids, normalize)``.

        Args:
            ids: (B, L) long token ids: where the text ends (CLIP pooling) or which positions
                are padding (HF attention mask); their embeddings are not read.
            embeds: (B, L, W) token embeddings (cast to the tower's dtype).
            normalize: L2-normalise the features.

        Returns:
            (B, D) text features.
        """
        raise NotImplementedError

    def _table(self) -> nn.Embedding:
        raise NotImplementedError

    def _check_layout(self, ids: set[int]) -> None:
        """Raise if text ids ``ids`` (besides start / end) would break the tower's pooling."""


def _text_pool() -> Callable[[torch.Tensor, torch.Tensor, str, int | None], torch.Tensor]:
    """open_clip's ``text_global_pool`` (signature and return value vary by version), or the
    end-of-text (argmax) pooling of open_clip < 2.23, which had no other."""
    try:
        from open_clip.transformer import text_global_pool
    except ImportError:  # pragma: no cover - open_clip < 2.23

        def argmax(x: torch.Tensor, ids: torch.Tensor, pool: str, eos: int | None) -> torch.Tensor:
            return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]

        return argmax
    takes_eos = "eos_token_id" in inspect.signature(text_global_pool).parameters

    def pool(x: torch.Tensor, ids: torch.Tensor, pool_type: str, eos: int | None) -> torch.Tensor:
        kwargs = {"eos_token_id": eos} if takes_eos else {}
        pooled = text_global_pool(x, ids, pool_type, **kwargs)
        return pooled[0] if isinstance(pooled, tuple) else pooled  # (pooled, tokens) < 3.0

    return pool


class _CLIPPromptEncoder(PromptEncoder):
    """open_clip's own text transformer (mirrors ``CLIP.encode_text``).

    open_clip's ``Transformer`` takes (B, L, W) whenever it has a ``batch_first`` attribute
    (open_clip >= 2.26 transposes inside when it is False); before 2.26 it had none and took
    (L, B, W), which ``CLIP.encode_text`` permuted to. The release permutes always (quirk
    Q13): wrong from 2.26 on.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.width = int(model.token_embedding.weight.shape[1])
        self.sequence_first = not hasattr(model.transformer, "batch_first")
        self.pool_type: str = getattr(model, "text_pool_type", "argmax")
        self.eos_id: int | None = getattr(model, "text_eos_id", None)
        self._pool = _text_pool()
        mask = getattr(model, "attn_mask", None)
        if mask is not None and self.pool_type in ("argmax", "eos"):
            causal = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
            self.prefix_exact = bool(torch.isinf(mask[causal]).all() and (mask[~causal] == 0).all())

    def _table(self) -> nn.Embedding:
        return self.model.token_embedding

    def encode(
        self, ids: torch.Tensor, embeds: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        length = ids.shape[1]  # the context length, or a prefix of it
        x = embeds.to(cast) + m.positional_embedding[:length].to(cast)
        mask = m.attn_mask
        mask = mask[:length, :length] if mask is not None else None
        if self.sequence_first:
            x = x.permute(1, 0, 2)
        x = m.transformer(x, attn_mask=mask)
        if self.sequence_first:
            x = x.permute(1, 0, 2)
        x = m.ln_final(x)
        x = self._pool(x, ids, self.pool_type, self.eos_id)
        projection = m.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1) if normalize else x

    def _check_layout(self, ids: set[int]) -> None:
        if self.pool_type == "argmax" and max(ids | set(self.start_ids)) >= max(self.end_ids):
            raise ValueError(
                f"argmax pooling needs the end token {max(self.end_ids)} to be the largest id; "
                f"the prompt holds {max(ids)}"
            )
        if self.pool_type == "eos" and self.eos_id in ids:
            raise ValueError(f"eos pooling: the prompt holds the end token {self.eos_id}")


class _HFPromptEncoder(PromptEncoder):
    """open_clip's ``HFTextEncoder`` (mirrors its ``forward``): attention mask
    ``ids != config.pad_token_id``, ``transformer(inputs_embeds=...)``, pooler, proj."""

    def __init__(self, model: Any, tokenizer: Tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.width = int(self._table().weight.shape[1])
        self.mask_pad_id = int(model.text.config.pad_token_id)
        # mean / CLS poolers read the unmasked tokens only (MaxPooler reads the padding)
        pooler = type(model.text.pooler).__name__
        self.prefix_exact = pooler in ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler")
        if self.mask_pad_id != self.pad_id:
            raise ValueError(
                f"the tokenizer pads with {self.pad_id}, the tower masks {self.mask_pad_id}"
            )

    def _table(self) -> nn.Embedding:
        return self.model.text.transformer.get_input_embeddings()

    def encode(
        self, ids: torch.Tensor, embeds: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        text = self.model.text
        mask = (ids != self.mask_pad_id).long()
        embeds = embeds.to(self._table().weight.dtype)
        out = text.transformer(inputs_embeds=embeds, attention_mask=mask)
        x = text.proj(text.pooler(out, mask))
        return F.normalize(x, dim=-1) if normalize else x

    def _check_layout(self, ids: set[int]) -> None:
        if self.mask_pad_id in ids:
            raise ValueError(f"the prompt holds the padding id {self.mask_pad_id}")


class SurrogatePrompts:
    """Surrogate captions of SemiCLIP: a learned context interleaved with the top concepts of
    each image.

    Per image, ``words`` word slots, each the context's tokens (their embeddings replaced by
    one copy of the learned context) followed by one concept's tokens, in descending score
    order: ``[start] ctx ctx ctx <concept 1> ctx ctx ctx <concept 2> ... [end] pad`` (the
    release's layout, quirk Q8; with CLIP BPE and ``"a photo includes"`` the context is 3
    tokens, so ``num_context`` C = 12 for 4 words). The ids at context positions are the
    context words' ids (they set the padding mask and the pooled position, never an
    embedding).

    Args:
        encoder: the text tower (:meth:`PromptEncoder.for_model`).
        concepts: the K concept words (a concept index i in ``top_concepts`` means
            ``concepts[i]``); each is tokenised alone, as the release does.
        words: concepts per caption (the release hard-codes 4, quirk Q10).
        context: the text whose tokens make one copy of the context (and its initial value).
        concept_tokens: ``"first"``: each concept contributes its first sub-token only
            (the release, quirk Q7: every caption has the same length); ``"all"``: all its
            sub-tokens (multi-token concepts kept whole; lengths then differ per caption).

    Attributes:
        num_context: C = context tokens x ``words``.
        max_length: the longest any caption can be (start, ``words`` x (context + the longest
            concept), end; at most L). Where the encoder is ``prefix_exact`` (CLIP's causal
            tower with end-token pooling, HF mean / CLS pooling) the captions are encoded on
            their first ``max_length`` positions only: the same features, less work.
        context_ids: the ids of one copy of the context.
        concept_table: (K, T_max) long: each concept's ids, padded with the pad id.
        concept_lengths: (K,) long: how many ids of each row are the concept's.

    Raises:
        ValueError: ``words`` exceeds K, a concept or the context tokenises to nothing, or the
            longest captions (the ``words`` longest concepts) do not fit the context length.
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        concepts: Sequence[str],
        words: int = 4,
        context: str = "a photo includes",
        concept_tokens: Literal["first", "all"] = "all",
    ) -> None:
        if concept_tokens not in ("first", "all"):
            raise ValueError(f"concept_tokens must be 'first' or 'all', not {concept_tokens!r}")
        if not 1 <= words <= len(concepts):
            raise ValueError(f"words={words} needs 1 <= words <= {len(concepts)} concepts")
        self.encoder = encoder
        self.concepts = list(concepts)
        self.words = words
        self.concept_tokens = concept_tokens
        self.context_ids = encoder.word_tokens([context])[0]
        if not self.context_ids:
            raise ValueError(f"the context {context!r} tokenises to nothing")
        self.num_context = len(self.context_ids) * words
        tokens = encoder.word_tokens(self.concepts)
        empty = [c for c, t in zip(self.concepts, tokens, strict=True) if not t]
        if empty:
            raise ValueError(f"concepts that tokenise to nothing: {empty[:10]}")
        if concept_tokens == "first":
            tokens = [t[:1] for t in tokens]
        lengths = torch.tensor([len(t) for t in tokens])
        self.concept_table = torch.full((len(tokens), int(lengths.max())), encoder.pad_id)
        for i, t in enumerate(tokens):
            self.concept_table[i, : len(t)] = torch.tensor(t)
        self.concept_lengths = lengths
        encoder._check_layout({*self.context_ids, *(i for t in tokens for i in t)})

        frame = len(encoder.start_ids) + len(encoder.end_ids)
        longest = lengths.topk(words)
        worst = frame + self.num_context + int(longest.values.sum())
        if worst > encoder.context_length:
            names = [self.concepts[i] for i in longest.indices.tolist()]
            raise ValueError(
                f"surrogate captions need up to {worst} tokens ({frame} start/end + {words} x "
                f"{len(self.context_ids)} context + {int(longest.values.sum())} for the "
                f"{words} longest concepts {names}, concept_tokens={concept_tokens!r}) but the "
                f"tokenizer's context length is {encoder.context_length}: use fewer words, a "
                "shorter context or concept_tokens='first'"
            )
        # any caption fits in `bound` tokens, repeated concepts included (top-k never repeats
        # one); past the context length, each call checks its captions
        bound = frame + self.num_context + words * int(lengths.max())
        self._check_calls = bound > encoder.context_length
        self.max_length = min(bound, encoder.context_length)
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on_device:
            e = self.encoder
            self._on_device[device] = tuple(
                t.to(device)
                for t in (
                    self.concept_table,
                    self.concept_lengths,
                    torch.tensor(self.context_ids * self.words),
                    torch.tensor(e.start_ids, dtype=torch.long),
                    torch.tensor(e.end_ids, dtype=torch.long),
                )
            )
        return self._on_device[device]

    def initial_context(self) -> torch.Tensor:
        """The release's initial context: the context words' token embeddings, repeated per
        word slot (custom/model.py:105-108).

        Returns:
            (C, W) detached clone (no tie to the token table).
        """
        ids = torch.tensor(self.context_ids, device=self.encoder.device)
        return self.encoder.token_embeddings(ids).detach().repeat(self.words, 1).clone()

    def token_ids(self, top_concepts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' token ids and where the context goes.

        Args:
            top_concepts: (B, words) long concept indices, in slot order.

        Returns:
            ids: (B, L) long: start, per slot the context ids then the concept's, end, pad.
            context_positions: (B, C) long: the position of each context row in each caption
                (row ``j * n + t`` of the context is token t of slot j's copy, n = context
                tokens).
        """
        if top_concepts.dim() != 2 or top_concepts.shape[1] != self.words:
            raise ValueError(
                f"top_concepts must be (B, {self.words}), not {tuple(top_concepts.shape)}"
            )
        device = top_concepts.device
        table, lengths, context_ids, start_ids, end_ids = self._tables(device)
        top = top_concepts.long()
        batch, n_ctx = top.shape[0], len(self.context_ids)
        length = self.encoder.context_length
        lens = lengths[top]  # (B, words)
        slot = n_ctx + lens
        slot_start = len(start_ids) + slot.cumsum(1) - slot  # (B, words): first context token
        end_at = len(start_ids) + slot.sum(1)  # (B,): first end token
        if self._check_calls and batch and int(end_at.max()) + len(end_ids) > length:
            raise ValueError(
                f"a caption needs {int(end_at.max()) + len(end_ids)} tokens, more than the "
                f"context length {length} (repeated long concepts in a row?)"
            )
        ctx_pos = slot_start[..., None] + torch.arange(n_ctx, device=device)
        ctx_pos = ctx_pos.reshape(batch, self.num_context)
        span = torch.arange(table.shape[1], device=device)
        concept_pos = slot_start[..., None] + n_ctx + span  # (B, words, T_max)
        # the unused columns of short concepts go to a spare column L, dropped below
        concept_pos = torch.where(span < lens[..., None], concept_pos, length)
        end_pos = end_at[:, None] + torch.arange(len(end_ids), device=device)
        ids = torch.full((batch, length + 1), self.encoder.pad_id, dtype=torch.long, device=device)
        ids[:, : len(start_ids)] = start_ids
        ids.scatter_(1, ctx_pos, context_ids.expand(batch, self.num_context))
        n_concept = self.words * table.shape[1]
        ids.scatter_(1, concept_pos.reshape(batch, n_concept), table[top].reshape(batch, n_concept))
        ids.scatter_(1, end_pos, end_ids.expand(batch, len(end_ids)))
        return ids[:, :length], ctx_pos

    def inputs(
        self, top_concepts: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' ids and token embeddings, the context positions taking ``context``.

        Args:
            top_concepts: (B, words) long concept indices, in slot order.
            context: (C, W) context rows (a parameter: the gradient reaches it).

        Returns:
            ids: (B, L) long (:meth:`token_ids`).
            embeds: (B, L, W) in the token table's dtype: the table's rows (gradient into the
                concepts' and the start / end rows), the context rows at context positions.
        """
        if tuple(context.shape) != (self.num_context, self.encoder.width):
            raise ValueError(
                f"context must be ({self.num_context}, {self.encoder.width}), "
                f"not {tuple(context.shape)}"
            )
        ids, ctx_pos = self.token_ids(top_concepts)
        embeds = self.encoder.token_embeddings(ids)
        batch, n, width = ids.shape[0], self.num_context, self.encoder.width
        rows = context.to(embeds.dtype).expand(batch, n, width)
        return ids, embeds.scatter(1, ctx_pos[..., None].expand(batch, n, width), rows)

    def __call__(self, top_concepts: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Encode the surrogate captions.

        Args:
            top_concepts: (B, words) long concept indices (descending score order).
            context: (C, W) context rows (a parameter).

        Returns:
            (B, D) L2-normalised text features.
        """
        ids, embeds = self.inputs(top_concepts, context)
        if self.encoder.prefix_exact:  # cut the padding after the longest possible caption
            ids, embeds = ids[:, : self.max_length], embeds[:, : self.max_length]
        return self.encoder.encode(ids, embeds, normalize=True)
