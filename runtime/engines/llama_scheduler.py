"""Continuous batching for one llama.cpp model: a thread that owns the model's context and, at
every step, decodes all active sequences in one `llama_decode`.

A request (a `Job`) takes one slot per choice. Slots are llama.cpp sequence ids in a context
with `n_seq_max = parallel` and a unified KV cache. Each step's batch holds one token for every
sequence that is decoding, then chunks of prompt for sequences still in prefill, up to
`batch_tokens` in all, and while others decode only as much prompt as keeps the step near
STEP_TARGET_S (chunked prefill: a long new prompt never stalls the streams already running).
Choices 2..n of a request wait for the first one's prompt, then copy its KV cells (`seq_cp`)
and decode side by side.

A slot keeps its tokens' KV cells after its sequence ends: the next request goes to the free slot
whose cached tokens share the longest prefix with its prompt, and only the rest is evaluated.
Reproducible requests (greedy or seeded) evaluate their whole prompt, as before batching, and
one that arrives while no other runs starts from an empty cache: cells computed in another batch
shape, or placed elsewhere in the cache, change the logits' last bits and would flip near-ties,
so the answer would depend on earlier requests. A cancelled sequence (its stream closed) frees
its slot and its cells at the next step; the others carry on.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.engines.llama_sampling import SamplerChain, token_logprob
from runtime.engines.llama_threads import ThreadChooser
from runtime.engines.text import TextAssembler
from runtime.engines.worker import DONE, relay
from runtime.types import Chunk, EngineError, GenerationRequest, TokenLogprob, Usage

# While sequences decode, a step with prompt chunks aims to last this long (see _prefill_budget).
STEP_TARGET_S = 0.15
# A step of batch work alone aims to last this long, decoding or not, while live requests come
# (one was here within LIVE_RECENT_S): a live request that arrives during it waits for it to end
# before its own steps, which batch work then sits out. With no live traffic, batch steps are cut
# as any others, for throughput.
BACKGROUND_STEP_S = 0.05
LIVE_RECENT_S = 5.0
MIN_PREFILL_CHUNK = 16  # a long prompt still moves when the step target is tight
PREFILL_SAMPLE_TOKENS = MIN_PREFILL_CHUNK  # steps with this many prompt tokens measure their cost
Piece = Callable[[int], bytes]


@dataclass
class Job:
    """One request: its prompt, limits and sampling, and the queue its chunks go to."""

    request: GenerationRequest
    prompt: list[int]
    budget: int
    stop: list[str]
    stop_ids: set[int]
    grammar: str | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sequences: list[Sequence] = field(default_factory=list)
    completion_tokens: int = 0
    unfinished: int = 0

    @property
    def reproducible(self) -> bool:
        return self.request.seed is not None or self.request.temperature <= 0


class Outbox:
    """Everything the thread tells its jobs (a step's chunks, failures), handed to each event
    loop in one call: one wake-up per loop and step instead of one per chunk (8 streams made 8
    self-pipe writes and 8 loop turns a step)."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}

    def post(self, job: Job, item: Any) -> None:
        self._items.setdefault(job.loop, []).append((job, item))

    def flush(self) -> None:
        for loop, items in self._items.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is gone: nobody reads these jobs any more
                for job, _ in items:
                    job.cancelled.set()
        self._items = {}


def _deliver(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.out.put_nowait(item)


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens whose KV cells it holds
    sequence: Sequence | None = None
    last_used: float = 0.0


@dataclass
class Sequence:
    """One choice of a job, decoding in its slot."""

    job: Job
    index: int
    slot: Slot
    chain: SamplerChain
    text: TextAssembler
    prompt_left: list[int] = field(default_factory=list)  # prefill still to evaluate
    waiting_for: Sequence | None = None  # choices 2..n wait for choice 1's prompt
    next_token: int | None = None
    produced: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class BatchScheduler:
    """The one thread that touches a llama.cpp context. `stream(job)` queues a job and yields
    its chunks; closing the stream cancels it."""

    def __init__(
        self,
        name: str,
        context: Any,
        vocab: Any,
        piece: Piece,
        *,
        parallel: int,
        slot_context: int,
        batch_tokens: int,
        prompt_cache: bool = True,
        window: int = 0,
        adaptive_threads: int = 0,
    ) -> None:
        import llama_cpp

        self.name = name
        self.parallel = parallel
        self.slot_context = slot_context
        self.batch_tokens = batch_tokens
        self.prompt_cache = prompt_cache
        # A sliding-window cache (swa_full false) keeps only the last `window` positions of a
        # sequence in its window layers once the room is needed; 0: every cell stays.
        self.window = window
        self._context = context
        self._memory = llama_cpp.llama_get_memory(context)
        self._vocab = vocab
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._piece = piece
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._slots = [Slot(seq_id) for seq_id in range(parallel)]
        self._outbox = Outbox()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._paused = False
        # Up to `adaptive_threads` threads, as many as the machine's load leaves free.
        self.threads = (
            ThreadChooser(lambda n: llama_cpp.llama_set_n_threads(context, n, n), adaptive_threads)
            if adaptive_threads > 1
            else None
        )
        self._seconds_per_token: float | None = None  # a prompt token's cost, measured
        self._live_at = -math.inf  # when a live job last arrived or ended (monotonic)
        # Counters read by stats() from the event loop; plain ints, written by this thread only.
        self.steps = 0
        self.sequences_per_step: Counter[int] = Counter()
        self.prompt_tokens_evaluated = 0
        self.prompt_cache_hit_tokens = 0
        self.tokens_generated = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the event loop's side -------------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncIterator[Chunk]:
        with self._wake:
            if self._closing:
                raise EngineError(f"{self.name} is unloading")
            if not job.request.background:
                self._live_at = time.monotonic()
            self._waiting.append(job)
            self._wake.notify()
        try:
            async for item in relay(job.out):
                yield item
        finally:
            job.cancelled.set()
            with self._wake:
                self._wake.notify()

    def stats(self) -> dict[str, Any]:
        busy = sum(1 for slot in self._slots if slot.sequence is not None)
        return {
            "parallel": self.parallel,
            "slots_busy": busy,
            "slots_free": self.parallel - busy,
            "running": busy,
            "waiting": len(self._waiting),
            "kv_cells_used": sum(len(slot.cached) for slot in self._slots),
            "kv_cells_total": self.parallel * self.slot_context,
            "prompt_cache_hit_tokens": self.prompt_cache_hit_tokens,
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "steps": self.steps,
            "sequences_per_step": {str(k): v for k, v in sorted(self.sequences_per_step.items())},
            "tokens_generated": self.tokens_generated,
        }

    def pause(self) -> None:
        """Take no step and admit no job until `resume()`: jobs queue up meanwhile, so they
        start together (a test builds a batch of a known shape this way)."""
        with self._wake:
            self._paused = True

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the work under way (new jobs are refused), then stop; what is still running
        after `timeout` seconds ends with an error. Returns once the thread is gone."""
        with self._wake:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._wake.notify()
        self._thread.join()

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        import llama_cpp

        try:
            while self._next_step():
                try:
                    self._step()
                except EngineError as exc:  # the step's jobs fail; the waiting ones go on
                    self._fail_running(exc)
        except BaseException as exc:  # a bug of ours: every job hears it, none hangs
            self._fail_all(EngineError(f"{self.name} failed: {type(exc).__name__}: {exc}"))
        finally:
            llama_cpp.llama_batch_free(self._batch)

    def _next_step(self) -> bool:
        """Wait for work; admit waiting jobs into free slots. False when it is time to stop."""
        with self._wake:
            while True:
                self._drop_cancelled()
                if self._paused and not self._closing:
                    self._wake.wait()
                    continue
                self._admit()
                active = any(slot.sequence is not None for slot in self._slots)
                if active:
                    self._bound_idle_cells()
                if self._closing and (
                    not (active or self._waiting) or time.monotonic() > self._deadline
                ):
                    self._fail_all(EngineError(f"{self.name} was unloaded"))
                    return False
                if active:
                    return True
                self._wake.wait(timeout=1.0 if self._closing else None)

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._waiting if job.cancelled.is_set()]:
            self._waiting.remove(job)
        for slot in self._slots:
            if slot.sequence is not None and slot.sequence.job.cancelled.is_set():
                self._free(slot.sequence, keep_cells=False)

    def _admit(self) -> None:
        while self._waiting:
            # First come, first served, live requests before batch work (`background`).
            job = next((j for j in self._waiting if not j.request.background), self._waiting[0])
            free = [slot for slot in self._slots if slot.sequence is None]
            if len(free) < job.request.n:
                return  # the head waits for its slots
            self._waiting.remove(job)
            self._start(job, free)

    def _start(self, job: Job, free: list[Slot]) -> None:
        if job.reproducible and len(free) == self.parallel:
            self._clear_cache()
        first = self._pick_slot(job, free)
        reuse = 0
        if self.prompt_cache and not job.reproducible:
            # At least the prompt's last token is evaluated: its logits give the first token.
            reuse = min(_common_prefix(first.cached, job.prompt), len(job.prompt) - 1)
            reuse = self._reusable(first, reuse)
        self._truncate(first, reuse)
        self.prompt_cache_hit_tokens += reuse
        others = [slot for slot in free if slot is not first][: job.request.n - 1]
        job.unfinished = job.request.n
        for index, slot in enumerate([first, *others]):
            seed = (
                job.request.seed + index if job.request.seed is not None else random.getrandbits(31)  # nosec B311  # a sampling seed, not a secret
            )
            chain = SamplerChain(self._vocab, self._n_vocab, job.request, seed, job.grammar)
            sequence = Sequence(job, index, slot, chain, TextAssembler(job.stop))
            if index == 0:
                sequence.prompt_left = job.prompt[reuse:]
            else:
                self._truncate(slot, 0)
                sequence.waiting_for = job.sequences[0]
            slot.sequence = sequence
            job.sequences.append(sequence)

    def _bound_idle_cells(self) -> None:
        """Idle slots' cached cells cost every running sequence: in a unified cache each step
        attends over every cell up to the highest one in use, masked or not (a single stream
        decoded 12% slower beside the 1,200 cells 8 finished streams left). So while sequences
        run, idle slots keep at most as many cells as the running ones hold (least recently
        used dropped first): attention spans at most twice what it needs, and a chat's next
        turn still finds its cells while the model is not busy with many others."""
        running = 0
        idle: list[Slot] = []
        for slot in self._slots:
            if slot.sequence is None:
                idle.append(slot)
            else:
                running += len(slot.cached) + len(slot.sequence.prompt_left)
        held = sum(len(slot.cached) for slot in idle)
        for slot in sorted(idle, key=lambda slot: slot.last_used):
            if held <= running:
                break
            held -= len(slot.cached)
            self._truncate(slot, 0)

    def _pick_slot(self, job: Job, free: list[Slot]) -> Slot:
        """The free slot whose cache shares the longest prefix with the prompt; else (and for
        reproducible jobs) the one that holds least, least recently used first."""
        if self.prompt_cache and not job.reproducible:
            best = max(
                free, key=lambda slot: (_common_prefix(slot.cached, job.prompt), -slot.last_used)
            )
            if _common_prefix(best.cached, job.prompt):
                return best
        return min(free, key=lambda slot: (len(slot.cached), slot.last_used))

    def _reusable(self, slot: Slot, tokens: int) -> int:
        """`tokens` when the cells that evaluating on from there needs are still in the cache,
        else 0: with a sliding window the next token attends to the `window` positions before
        it, and those may have been overwritten (llama.cpp's server applies the same test)."""
        import llama_cpp

        if tokens and self.window:
            first = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id)
            if first < 0 or first > max(0, tokens - self.window):
                return 0
        return tokens

    def _clear_cache(self) -> None:
        """Every slot's cells go. A reproducible job alone then computes exactly as it would on
        a fresh context: where its cells lie, and how many cells attention spans, change the
        last bits of the logits, and those flip near-ties."""
        import llama_cpp

        # Only the cells' bookkeeping: zeroing the buffers (hundreds of MB) would add tens of ms
        # to the request, and masked cells never reach a result.
        llama_cpp.llama_memory_clear(self._memory, False)
        for slot in self._slots:
            slot.cached.clear()

    def _truncate(self, slot: Slot, keep: int) -> None:
        import llama_cpp

        if len(slot.cached) > keep:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
            del slot.cached[keep:]

    def _free(self, sequence: Sequence, *, keep_cells: bool) -> None:
        slot = sequence.slot
        sequence.chain.close()
        slot.sequence = None
        slot.last_used = time.monotonic()
        if not keep_cells or not self.prompt_cache:
            self._truncate(slot, 0)

    def _fail_running(self, error: EngineError) -> None:
        """Every running job ends with `error`; the cache is emptied, since a failed decode
        leaves its cells in an unknown state."""
        for slot in self._slots:
            if slot.sequence is not None:
                self._outbox.post(slot.sequence.job, error)
                slot.sequence.job.cancelled.set()
                self._free(slot.sequence, keep_cells=False)
        self._outbox.flush()
        self._clear_cache()

    def _fail_all(self, error: EngineError) -> None:
        self._fail_running(error)
        while self._waiting:
            self._outbox.post(self._waiting.popleft(), error)
        self._outbox.flush()

    # --- one step ----------------------------------------------------------------------------

    def _step(self) -> None:
        import llama_cpp

        batch = self._batch
        outputs: list[tuple[int, Sequence]] = []  # (batch row, sequence sampled from it)
        fed: list[tuple[Slot, list[int]]] = []
        count = 0
        running = self._this_step()
        decoding = [s for s in running if s.next_token is not None]
        for sequence in decoding:
            assert sequence.next_token is not None
            _put(
                batch,
                count,
                sequence.next_token,
                len(sequence.slot.cached),
                sequence.slot.seq_id,
                True,
            )
            outputs.append((count, sequence))
            fed.append((sequence.slot, [sequence.next_token]))
            sequence.next_token = None
            count += 1
        prefilling = sorted(
            (s for s in running if s.prompt_left), key=lambda sequence: len(sequence.prompt_left)
        )
        background = all(sequence.job.request.background for sequence in running) and (
            time.monotonic() - self._live_at < LIVE_RECENT_S
        )
        budget = self._prefill_budget(decoding=count, background=background)
        for sequence in prefilling:
            room = budget - count
            if room <= 0:
                break
            chunk, sequence.prompt_left = sequence.prompt_left[:room], sequence.prompt_left[room:]
            start = len(sequence.slot.cached)
            for offset, token in enumerate(chunk):
                last = offset == len(chunk) - 1 and not sequence.prompt_left
                _put(batch, count, token, start + offset, sequence.slot.seq_id, last)
                if last:
                    outputs.append((count, sequence))
                count += 1
            fed.append((sequence.slot, chunk))
            self.prompt_tokens_evaluated += len(chunk)
        batch.n_tokens = count
        if self.threads is not None:
            self.threads.before()
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._context, batch)
        if status != 0:  # 1: no room in the KV cache; < 0: llama.cpp failed
            raise EngineError(f"{self.name}: llama.cpp could not decode (status {status})")
        if count - len(decoding) >= PREFILL_SAMPLE_TOKENS:
            cost = (time.perf_counter() - started) / count
            previous = self._seconds_per_token
            self._seconds_per_token = cost if previous is None else 0.7 * previous + 0.3 * cost
        for slot, tokens in fed:
            slot.cached.extend(tokens)
        self.steps += 1
        self.sequences_per_step[len({slot.seq_id for slot, _ in fed})] += 1
        try:
            for row, sequence in outputs:
                if sequence.index == 0 and sequence.job.request.n > 1:
                    self._share_prompt(sequence, row)
                self._sample(sequence, row)
        finally:
            self._outbox.flush()

    def _this_step(self) -> list[Sequence]:
        """The sequences this step may advance: while any live sequence has work, only live
        ones (batch work waits, its cells kept, so it never slows a live stream); else all."""
        running = [slot.sequence for slot in self._slots if slot.sequence is not None]
        live = [
            s
            for s in running
            if not s.job.request.background and (s.next_token is not None or s.prompt_left)
        ]
        return live or running

    def _prefill_budget(self, decoding: int, *, background: bool = False) -> int:
        """Tokens this step may hold. While sequences decode, prompt chunks are cut so that the
        step lasts about STEP_TARGET_S at the prompt-token cost measured so far: a long new
        prompt then pauses the running streams for that long per step, not for its whole
        prefill. Alone, a prompt takes whole `batch_tokens` chunks. A step of batch work alone
        while live requests come is cut to BACKGROUND_STEP_S either way."""
        if self._seconds_per_token is None or not (decoding or background):
            return self.batch_tokens
        target = BACKGROUND_STEP_S if background else STEP_TARGET_S
        fits = int(target / self._seconds_per_token)
        return min(self.batch_tokens, max(fits, decoding + MIN_PREFILL_CHUNK))

    def _share_prompt(self, first: Sequence, row: int) -> None:
        """Choice 1's prompt is in: choices 2..n take its cells and draw from its logits."""
        import llama_cpp

        for sequence in first.job.sequences[1:]:
            if sequence.waiting_for is not first or sequence.slot.sequence is not sequence:
                continue
            llama_cpp.llama_memory_seq_cp(
                self._memory, first.slot.seq_id, sequence.slot.seq_id, -1, -1
            )
            sequence.slot.cached = list(first.slot.cached)
            sequence.waiting_for = None
            self._sample(sequence, row)

    def _sample(self, sequence: Sequence, row: int) -> None:
        import llama_cpp

        job = sequence.job
        if job.cancelled.is_set():
            return
        token = sequence.chain.sample(self._context, row)
        if token in job.stop_ids or llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(sequence, "stop")
            return
        sequence.produced += 1
        job.completion_tokens += 1
        self.tokens_generated += 1
        if job.request.logprobs is not None:
            sequence.logprobs.append(
                token_logprob(
                    self._context, row, self._n_vocab, token, job.request.logprobs, self._piece
                )
            )
        text = sequence.text
        piece = text.feed(self._piece(token))
        if piece or text.stopped:
            self._outbox.post(
                job, Chunk(index=sequence.index, text=piece, logprobs=sequence.logprobs)
            )
            sequence.logprobs = []
        if text.stopped:
            self._finish(sequence, "stop")
        elif sequence.produced >= job.budget:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _finish(self, sequence: Sequence, reason: str) -> None:
        job = sequence.job
        job.unfinished -= 1
        last = job.unfinished == 0
        chunk = Chunk(
            index=sequence.index,
            text=sequence.text.flush(),
            logprobs=sequence.logprobs,
            finish_reason=reason,
            stop_sequence=sequence.text.matched,
            usage=Usage(len(job.prompt), job.completion_tokens) if last else None,
        )
        if not job.request.background:
            self._live_at = time.monotonic()
        # Free before the caller hears the end, so stats read after a stream are settled.
        self._free(sequence, keep_cells=True)
        self._outbox.post(job, chunk)
        if last:
            self._outbox.post(job, DONE)


def _put(batch: Any, row: int, token: int, position: int, seq_id: int, output: bool) -> None:
    batch.token[row] = token
    batch.pos[row] = position
    batch.n_seq_id[row] = 1
    batch.seq_id[row][0] = seq_id
    batch.logits[row] = output


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
