"""llama.cpp's native sampler chains, one per sequence, and logprobs for those who ask.

A chain is built from a request's settings in llama.cpp's own order (the one its server uses):
grammar, penalties, top_k, top_p, min_p, temperature, then a seeded draw, or greedy when the
temperature is 0. All of it runs in C over the vocabulary; nothing scans the 262,144 logits of
Gemma in Python. Two exceptions, both numpy: logprobs, for the requests that ask for them, and
plain greedy (no grammar, no penalties), which is an argmax of the row. llama.cpp's chain
first copies every logit into a candidate array (3 MB a token for Gemma), about half a
millisecond a sequence per step that the argmax does not spend: at 8 greedy streams that was
a tenth of each step. Both pick the first of equal maxima.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from runtime.engines.schema_limits import SchemaTooComplex
from runtime.types import GenerationRequest, TokenLogprob

PENALTY_LAST_N = 64  # llama-cpp-python's `last_n_tokens_size`, which the old path used


class SamplerChain:
    """One sequence's sampler chain. `sample(context, index)` draws from the logits of batch
    row `index` and feeds the draw back (penalties, grammar state); `close()` frees it."""

    def __init__(
        self, vocab: Any, n_vocab: int, request: GenerationRequest, seed: int, grammar: str | None
    ) -> None:
        import llama_cpp

        self._n_vocab = n_vocab
        self._argmax = (
            grammar is None
            and request.temperature <= 0
            and request.repeat_penalty == 1.0
            and request.frequency_penalty == 0.0
            and request.presence_penalty == 0.0
        )
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        parts: list[Any] = []
        if grammar is not None:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not sampler:  # checked when the request came in; the vocabulary is the same
                self.close()
                raise SchemaTooComplex("llama.cpp refused the grammar built from the schema")
            parts.append(sampler)
        if (
            request.repeat_penalty != 1.0
            or request.frequency_penalty != 0.0
            or request.presence_penalty != 0.0
        ):
            parts.append(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    request.repeat_penalty,
                    request.frequency_penalty,
                    request.presence_penalty,
                )
            )
        if request.temperature <= 0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if request.top_k > 0:
                parts.append(llama_cpp.llama_sampler_init_top_k(request.top_k))
            if request.top_p < 1.0:
                parts.append(llama_cpp.llama_sampler_init_top_p(request.top_p, 1))
            if request.min_p > 0.0:
                parts.append(llama_cpp.llama_sampler_init_min_p(request.min_p, 1))
            parts.append(llama_cpp.llama_sampler_init_temp(request.temperature))
            parts.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for part in parts:  # the chain owns (and frees) what it holds
            llama_cpp.llama_sampler_chain_add(self._chain, part)

    def sample(self, context: Any, index: int) -> int:
        import llama_cpp

        if self._argmax:
            return int(_logits(context, index, self._n_vocab).argmax())
        return int(llama_cpp.llama_sampler_sample(self._chain, context, index))

    def close(self) -> None:
        import llama_cpp

        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def token_logprob(
    context: Any, index: int, n_vocab: int, token: int, top: int, piece: Any
) -> TokenLogprob:
    """The chosen token's log-probability under the model's raw distribution (before the
    sampling settings), with the `top` most likely alternatives. `piece(token)` gives bytes."""
    logits = _logits(context, index, n_vocab)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    alternatives: list[tuple[str, float]] = []
    if top:
        best = np.argpartition(-logprobs, top)[:top]
        best = best[np.argsort(-logprobs[best])]
        alternatives = [
            (piece(int(t)).decode("utf-8", "replace"), float(logprobs[t])) for t in best
        ]
    chosen = piece(token)
    return TokenLogprob(
        token=chosen.decode("utf-8", "replace"),
        logprob=float(logprobs[token]),
        bytes=list(chosen),
        top=alternatives,
    )


def _logits(context: Any, index: int, n_vocab: int) -> Any:
    """Batch row `index`'s logits, as a numpy view of llama.cpp's buffer (valid until the next
    decode)."""
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(context, index)
    return np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
