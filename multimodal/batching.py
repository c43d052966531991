"""Continuous batching: concurrent requests decode together, one forward per step for all of them.

Decoding one token is bound by reading the weights (or, for a small model on a CPU, by per-step
overhead), not by arithmetic, so a step for eight rows costs little more than a step for one.
:class:`BatchEngine` keeps a KV cache of ``slots`` rows, one per request in flight. A scheduler
thread loops: it admits waiting requests into free slots (each prefilled alone into its own row, with
its own image's prompt keys/values), then runs one decoding step over the rows in use, each row at its
own position (``Transformer.step`` with a position per row), samples each row with its own settings,
and hands every request its token. A request joins at the next step and leaves when it is done,
cancelled, or its reader goes away; its slot is free for the next one at once.

Rows between slots in use that hold no request are fed a dummy token at the cache's spare position
(``max_seq_len``, never attended to), so they change nothing. A slot keeps the token ids whose keys and
values it holds; a new request goes preferably to the free slot whose ids share the longest prefix
with its prompt, and prefills only the rest (a follow-up turn of the same chat).

The page and the OpenAI endpoint share one engine; ``stream`` and ``token_ids`` have Engine's signatures. Requests with
another adapter (the caption expert's swap) need the model to themselves: they wait until no batched
request is in flight and run alone.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .adapter import PromptKV
from .card import ModelCard
from .generate import Engine, GenerationStats, SamplingParams, common_prefix, sample, visible_length
from .loading import LoadedModel

if TYPE_CHECKING:
    from .swap import AdapterSwap

_DONE = object()  # end of a request's token stream


@dataclass
class _Request:
    ids: list[int]
    prompts: list[PromptKV | None]
    params: SamplingParams
    max_new: int
    cancel: threading.Event
    stats: GenerationStats
    out: "queue.Queue[object]" = field(default_factory=queue.Queue)  # token ids, then _DONE or an exception
    generator: torch.Generator | None = None
    start: float = field(default_factory=time.perf_counter)
    slot: int = -1
    pos: int = 0  # where the next fed token goes
    token: int = 0  # the last sampled token, fed at the next step
    produced: int = 0


class BatchEngine(Engine):
    """An Engine whose requests decode together (see the module docstring). ``slots``: requests in
    flight at once; more wait in line."""

    def __init__(self, loaded: LoadedModel, slots: int = 8, image_cache_size: int = 8,
                 card: ModelCard | None = None) -> None:
        if slots < 1:
            raise ValueError("a batching engine needs at least one slot")
        super().__init__(loaded, image_cache_size=image_cache_size, card=card)
        self.slots = slots
        self.model.llama.setup_cache(batch=slots)
        self._slot_ids: list[list[int]] = [[] for _ in range(slots)]  # ids whose keys/values each row holds
        self._slot_prompts: list[object] = [None] * slots  # the prompts they were computed with
        self._active: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._held = False  # see gathered()
        self._exclusive = threading.Lock()  # held by the scheduler while it touches the model
        self._row_prompts: tuple[tuple[int, ...], list[PromptKV | None] | None] = ((), None)
        self.step_log: deque[tuple[int, float]] = deque(maxlen=65536)  # (requests stepped, seconds): for benchmarks
        self._positions = torch.arange(self.max_seq_len, device=self.model.device)  # sliced into each step's visible prefix
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._thread.start()

    # --- requests ---------------------------------------------------------------------------------------

    def token_ids(self, prompt: str | list[int], image: Image.Image | None = None,
                  params: SamplingParams = SamplingParams(), cancel: threading.Event | None = None,
                  stats: GenerationStats | None = None, prompts: list[PromptKV | None] | None = None,
                  adapter: "AdapterSwap | None" = None) -> Iterator[int]:
        if adapter is not None:  # swaps weights: the model to itself, no batched request in flight
            yield from self._alone(prompt, image, params, cancel, stats, prompts, adapter)
            return
        stats = stats if stats is not None else GenerationStats()
        ids, room = self.prompt_ids(prompt, stats)
        if prompts is None:
            with self._lock:  # the image cache
                prompts = self._image_prompts(image, None)
        req = _Request(ids, prompts, params, min(params.max_new_tokens, room), cancel or threading.Event(), stats)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        with self._wake:
            self._waiting.append(req)
            self._wake.notify_all()  # the scheduler, and a gathered() block counting arrivals
        try:
            while True:
                item = req.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            req.cancel.set()  # a reader that stops early (closed stream, error) frees the slot at the next step

    def _alone(self, prompt: str | list[int], image: Image.Image | None, params: SamplingParams,
               cancel: threading.Event | None, stats: GenerationStats | None,
               prompts: list[PromptKV | None] | None, adapter: "AdapterSwap") -> Iterator[int]:
        while True:
            with self._exclusive:
                with self._wake:
                    idle = not self._active and not self._waiting
                if idle:
                    with self.model.llama.cache_rows(0, 1):  # Engine's batch-1 path in row 0
                        self._slot_ids[0], self._slot_prompts[0] = [], None
                        self._kv_ids, self._kv_prompts, self._kv_adapter = [], None, None
                        yield from super().token_ids(prompt, image, params, cancel, stats, prompts, adapter)
                        self._kv_ids, self._kv_prompts, self._kv_adapter = [], None, None
                    return
            time.sleep(0.005)

    @contextmanager
    def gathered(self, requests: int, timeout: float = 60.0) -> Iterator[None]:
        """Start nothing while the block runs; at its end, wait until ``requests`` requests are in line
        (at most ``timeout`` seconds), then admit them together. For benchmarks and tests that need N
        requests decoding side by side from their first step, whatever their threads' timing: submit
        them from threads started inside the block. Requests already in flight pause while it runs."""
        with self._wake:
            self._held = True
        try:
            yield
        finally:
            with self._wake:
                self._wake.wait_for(lambda: len(self._waiting) >= requests, timeout)
                self._held = False
                self._wake.notify_all()

    def _forget(self) -> None:
        super()._forget()
        self._slot_prompts = [None] * self.slots  # no slot's keys/values count as reusable any more

    # --- the scheduler ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._held or (not self._waiting and not self._active):
                    self._wake.wait()
                admitted = []
                while self._waiting and len(self._active) < self.slots:
                    req = self._waiting.popleft()
                    req.slot = self._pick_slot(req)
                    self._active[req.slot] = req
                    admitted.append(req)
            with self._exclusive, torch.inference_mode():
                for req in admitted:
                    self._guard(lambda r=req: self._prefill(r), [req])
                if self._active:
                    n, started = len(self._active), time.perf_counter()
                    self._guard(self._decode_step, list(self._active.values()))
                    self.step_log.append((n, time.perf_counter() - started))

    def _guard(self, work: Callable[[], None], reqs: list[_Request]) -> None:
        """Run ``work``; an error ends the requests it concerns (their readers raise it), not the loop."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 (handed to the request's reader)
            for req in reqs:
                self._finish(req, e)

    def _pick_slot(self, req: _Request) -> int:
        """The free slot holding the longest prefix of this prompt (computed with the same prompts),
        else the lowest free one, so the rows in use stay packed at the front."""
        free = [s for s in range(self.slots) if s not in self._active]
        def reuse(s: int) -> int:
            return common_prefix(self._slot_ids[s], req.ids) if self._slot_prompts[s] is req.prompts else 0
        return max(free, key=lambda s: (reuse(s), -s))

    def _prefill(self, req: _Request) -> None:
        slot, ids = req.slot, req.ids
        reuse = 0
        if self._slot_prompts[slot] is req.prompts:
            reuse = min(common_prefix(self._slot_ids[slot], ids), len(ids) - 1)
        self._slot_ids[slot], self._slot_prompts[slot] = ids[:reuse], req.prompts
        req.stats.reused_tokens = reuse
        llama = self.model.llama
        with llama.cache_rows(slot, 1):
            logits = llama(torch.tensor([ids[reuse:]], device=self.model.device), start_pos=reuse,
                           prompts=req.prompts, last_only=True)
        self._slot_ids[slot] = list(ids)
        req.pos = len(ids)
        token = int(sample(logits, req.params.temperature, req.params.top_p, req.generator)[0])
        req.stats.first_token_s = time.perf_counter() - req.start
        self._emit(req, token)

    def _decode_step(self) -> None:
        """One forward for every request in flight, each row at its own position."""
        rows = max(self._active) + 1
        device = self.model.device
        spare = self.max_seq_len  # the cache's never-attended position: idle rows write there
        tokens = [self._active[r].token if r in self._active else 0 for r in range(rows)]
        positions = [self._active[r].pos if r in self._active else spare for r in range(rows)]
        longest = max(self._active[r].pos for r in self._active)
        visible = self._positions[:visible_length(longest, self.max_seq_len)]  # [T]: later keys are masked anyway
        llama = self.model.llama
        with llama.cache_rows(0, rows):
            logits = llama.step(torch.tensor(tokens, device=device)[:, None], torch.tensor(positions, device=device),
                                self._prompts_for(rows), visible)  # [rows, vocab]
        greedy = logits.argmax(dim=-1)  # [rows]
        for r, req in list(self._active.items()):
            self._slot_ids[r].append(req.token)
            req.pos += 1
            if req.params.temperature > 0:
                greedy[r] = sample(logits[r:r + 1], req.params.temperature, req.params.top_p, req.generator)[0]
        chosen = greedy.tolist()  # one host read for all rows
        for r, req in list(self._active.items()):
            self._emit(req, chosen[r])

    def _prompts_for(self, rows: int) -> list[PromptKV | None] | None:
        """Each prompted layer's prompt keys/values stacked over the rows ([rows, n_kv_heads, P, D]):
        every request its own image's; idle rows zeros. Rebuilt only when the rows' requests change."""
        who = tuple(id(self._active[r].prompts) if r in self._active else 0 for r in range(rows))
        if self._row_prompts[0] == who:
            return self._row_prompts[1]
        first = next(iter(self._active.values())).prompts
        if all(p is None for p in first):
            stacked = None
        else:
            stacked = []
            for i, layer in enumerate(first):
                if layer is None:
                    stacked.append(None)
                    continue
                ks = [self._active[r].prompts[i].k if r in self._active else torch.zeros_like(layer.k)
                      for r in range(rows)]
                vs = [self._active[r].prompts[i].v if r in self._active else torch.zeros_like(layer.v)
                      for r in range(rows)]
                stacked.append(PromptKV(torch.cat(ks), torch.cat(vs), layer.gate))  # gates: the model's, shared
        self._row_prompts = (who, stacked)
        return stacked

    def _emit(self, req: _Request, token: int) -> None:
        """Hand the request its sampled token, or end it (stop token, length, cancelled)."""
        stats = req.stats
        if req.cancel.is_set():
            stats.stop_reason = "cancelled"
        elif token in self.tokenizer.stop_ids:
            stats.stop_reason = "eos"
        else:
            req.produced += 1
            stats.new_tokens = req.produced
            req.token = token
            req.out.put(token)
            if req.produced < req.max_new:
                stats.total_s = time.perf_counter() - req.start
                return
            stats.stop_reason = "length"
        self._finish(req, None)

    def _finish(self, req: _Request, error: BaseException | None) -> None:
        req.stats.total_s = time.perf_counter() - req.start
        with self._wake:
            if self._active.get(req.slot) is req:
                del self._active[req.slot]
        req.out.put(_DONE if error is None else error)
