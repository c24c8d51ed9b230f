"""Training-time caption mitigations (Somepalli et al., "Understanding and Mitigating Copying in Diffusion Models",
NeurIPS 2023): a model copies its training images largely because their captions pin them down, so these make the
caption an item is trained on less reliable.

- ``random_replace``: with probability ``p`` an item is trained on ``tokens`` random vocabulary words instead of
  its caption.
- ``random_insert``: with probability ``p``, ``tokens`` random vocabulary words are inserted at random positions of
  its caption.
- ``embedding_noise``: Gaussian noise of standard deviation ``sigma`` is added to the item's text embedding (with
  probability ``p``, every item by default).

Defaults (``PUBLISHED``) are those of the authors' public training script: probability 0.1 for both caption
changes, 4 random tokens for a replaced caption, 2 inserted words. Their script takes the embedding noise strength as
a flag that is off by default; 0.1 here is our choice. Random words are drawn from the tokenizer's own vocabulary
(its whole-word tokens), as token ids: what the text encoder sees is always tokens the model knows.

Draws come from a generator seeded by the run's seed and the step, separate from the loop's generator: a run with a
mitigation sees the same batches, noise and timesteps as the same run without it; only the captions differ.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from ..config.base import Section
from ..errors import ConfigError

KINDS = ("none", "random_replace", "random_insert", "embedding_noise")
TEXT_KINDS = ("random_replace", "random_insert")
PUBLISHED = {"random_replace": {"p": 0.1, "tokens": 4}, "random_insert": {"p": 0.1, "tokens": 2},
             "embedding_noise": {"p": 1.0, "tokens": 0}}


class CaptionStrength(Section):
    """How strong a caption mitigation is: ``p`` and ``tokens`` left unset take the published defaults of the kind
    (``PUBLISHED``); ``sigma`` is the embedding noise's standard deviation. ``baselines.captions`` in a search."""

    p: float | None = Field(None, ge=0, le=1)
    tokens: int | None = Field(None, ge=1)
    sigma: float = Field(0.1, gt=0)


class CaptionMitigation(CaptionStrength):
    """``train.caption_mitigation``: which mitigation (``none`` by default) and its strength."""

    kind: Literal[KINDS] = "none"

    def resolved(self) -> tuple[float, int]:
        """(probability, tokens) with the published defaults filled in."""
        published = PUBLISHED.get(self.kind, {"p": 0.0, "tokens": 0})
        return (published["p"] if self.p is None else self.p,
                published["tokens"] if self.tokens is None else self.tokens)


def word_token_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's whole-word tokens (CLIP BPE marks a word's end with ``</w>``), specials left out;
    every non-special token for a tokenizer without that mark."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items()
                   if i not in special and t.endswith("</w>") and re.fullmatch(r"[a-z0-9]{2,}", t[:-4]))
    return words or sorted(i for i in vocab.values() if i not in special)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) + 1) % 2**63)


def randomise_captions(captions: list[str], kind: str, p: float, tokens: int, tokenizer, vocab: list[int],
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N x max_length, padded like ``memcontrol.training.cache.tokenize``) of the captions after the
    mitigation, and which of them it changed (N bools, each true with probability ``p``)."""
    if kind not in TEXT_KINDS:
        raise ConfigError(f"caption mitigation '{kind}' does not change caption text")
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hit = torch.rand(len(captions), generator=gen) < p
    rows = []
    for caption, changed in zip(tokenizer(list(captions), truncation=True, max_length=length).input_ids, hit):
        bos, body, eos = caption[0], list(caption[1:-1]), caption[-1]
        if changed:
            words = [vocab[int(k)] for k in torch.randint(0, len(vocab), (tokens,), generator=gen)]
            if kind == "random_replace":
                body = words
            else:
                for word in words:
                    body.insert(int(torch.randint(0, len(body) + 1, (1,), generator=gen)), word)
        ids = [bos, *body[:length - 2], eos]
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), hit


class CaptionMitigator:
    """The loop's hook: ``mitigator(embeds, indices, step)`` gives the text embeddings a batch is trained on."""

    def __init__(self, spec: CaptionMitigation, pipe, captions: list[str] | None, seed: int):
        self.kind = spec.kind
        self.p, self.tokens = spec.resolved()
        self.sigma = spec.sigma
        self.seed = seed
        if self.kind in TEXT_KINDS:
            if captions is None:
                raise ConfigError(f"train.caption_mitigation {self.kind} needs the training captions; the training "
                                  "data given to the loop has none (a CachedData has them)")
            self.captions = list(captions)
            self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
            self.vocab = word_token_ids(self.tokenizer)

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor, indices: torch.Tensor, step: int) -> torch.Tensor:
        gen = step_generator(self.seed, step)
        if self.kind == "embedding_noise":
            hit = (torch.rand(len(indices), generator=gen) < self.p).to(embeds.device, embeds.dtype)
            noise = torch.randn(embeds.shape, generator=gen).to(embeds.device, embeds.dtype)
            return embeds + self.sigma * noise * hit.view(-1, 1, 1)
        ids, hit = randomise_captions([self.captions[int(i)] for i in indices], self.kind, self.p, self.tokens,
                                      self.tokenizer, self.vocab, gen)
        if not hit.any():
            return embeds
        device = next(self.text_encoder.parameters()).device
        changed = self.text_encoder(ids[hit].to(device))[0]
        out = embeds.clone()
        out[hit.to(out.device)] = changed.to(out.device, out.dtype)
        return out


def caption_mitigator(spec: CaptionMitigation, pipe, cached, seed: int) -> CaptionMitigator | None:
    """The hook for ``spec``, or None when it is off (``kind: none`` or ``p`` 0): the loop then runs as before."""
    if spec.kind == "none" or spec.resolved()[0] == 0:
        return None
    return CaptionMitigator(spec, pipe, getattr(cached, "captions", None), seed)
