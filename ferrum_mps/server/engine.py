"""The model side of `serve`: one worker thread decoding queued requests together as left-padded batches.

Static batching on the public `model.generate()`: the worker takes the oldest queued request plus
every queued request that can share its generate() call (same sampling arguments, fits the
context), left-pads their prompts into one batch and decodes them together. A per-row
StoppingCriteria is the hook that sees each new token: it streams the row's text, applies its
`max_tokens`, stop strings and cancellation, and reports the row finished, so generate() stops
when every row is. Requests that arrive meanwhile wait for the next batch. No HTTP in here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self):
        """Requests with equal keys can share one generate() call; None: this one runs alone.

        A seeded request runs alone so that its random stream does not depend on who shares its batch.
        """
        if self.temperature == 0:
            return ("greedy",)  # a seed changes nothing here
        return None if self.seed is not None else ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion: what the Deltas add up to


@dataclass(frozen=True)
class Failed:
    message: str


class IncrementalText:
    """Decoded text of a growing token list, released only where it can no longer change.

    Held back: a trailing U+FFFD (a multi-byte character whose remaining bytes come with the next
    token) and a tail that could be the start of a stop string. So the released pieces add up to
    the final text, and a stop string never leaks out before it is recognised.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def add(self, token_id: int) -> tuple[str, bool]:
        """(newly releasable text, whether a stop string ended the text)."""
        self.ids.append(token_id)
        full = self.decode(self.ids)
        hits = [i for s in self.stop if (i := full.find(s)) >= 0]
        if hits:
            self.text = full[: min(hits)]
            return self.flush(), True
        self.text = full
        safe = full.rstrip("\ufffd")
        return self._release(len(safe) - self._stop_prefix(safe)), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece


class Job:
    """One request: prompt ids, sampling, and `deliver` (called from the worker thread with Delta/Done/Failed)."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, deliver: Callable[[object], None]):
        self.prompt_ids, self.sampling, self._deliver = list(prompt_ids), sampling, deliver
        self.cancelled = False  # set by the HTTP side when the client goes away
        self.outcome: str | None = None  # "completed", "cancelled" or "failed" once finished
        self.text: IncrementalText | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def cancel(self) -> None:
        self.cancelled = True

    def start(self, decode) -> None:
        self.text = IncrementalText(decode, self.sampling.stop)

    def step(self, token_id: int, eos: frozenset[int]) -> bool:
        """Take the row's next token; True when the row is finished (it then ignores later tokens)."""
        if self.finished:
            return True
        if self.cancelled:
            self.outcome = "cancelled"
            return True
        piece, stopped = self.text.add(token_id)
        if piece:
            self._deliver(Delta(piece))
        if stopped or token_id in eos:
            return self.finish("stop")
        if len(self.text.ids) >= self.sampling.max_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        rest = self.text.flush()
        if rest:
            self._deliver(Delta(rest))
        self.outcome = "completed"
        self._deliver(Done(reason, len(self.prompt_ids), len(self.text.ids), self.text.text))
        return True

    def fail(self, message: str) -> None:
        if not self.finished:
            self.outcome = "failed"
            self._deliver(Failed(message))


class _Rows(StoppingCriteria):
    """generate()'s per-step hook: hands each row its new token, says which rows are finished."""

    def __init__(self, jobs: list[Job], eos: frozenset[int]):
        self.jobs, self.eos = jobs, eos
        self.done = [False] * len(jobs)

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if not self.done[i]:
                self.done[i] = job.step(last[i], self.eos)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the model: `submit(job)` from any thread; one daemon thread runs the batches."""

    def __init__(self, model, tokenizer, max_batch: int = 8, tokenizer_lock: threading.Lock | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = int(model.config.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos = frozenset(eos)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        # The fast tokenizer is not safe to use from two threads at once (HTTP side encodes, we decode).
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._closed = False
        self._running: list[Job] = []
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "generated_tokens": 0}
        self._thread = threading.Thread(target=self._run, name="ferrum-serve-model", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- called from other threads

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> dict:
        with self._cv:
            return {"queued": len(self._pending), "active": len(self._running), **self.stats}

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            for job in self._running:
                job.cancel()
            self._cv.notify_all()
        self._thread.join(timeout)

    # -------------------------------------------------------------- the worker thread

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._pending:
                        job.fail("the server is shutting down")
                    self._pending.clear()
                    return None
                first = self._pending.popleft()
                if first.cancelled:  # its client left while it waited
                    self.stats["cancelled"] += 1
                    continue
                batch, key, rest = [first], first.sampling.batch_key(), deque()
                longest, most = len(first.prompt_ids), first.sampling.max_tokens
                for job in self._pending:
                    fits = max(longest, len(job.prompt_ids)) + max(most, job.sampling.max_tokens) <= self.context
                    if job.cancelled:
                        self.stats["cancelled"] += 1
                    elif key is not None and len(batch) < self.max_batch and job.sampling.batch_key() == key and fits:
                        batch.append(job)
                        longest, most = max(longest, len(job.prompt_ids)), max(most, job.sampling.max_tokens)
                    else:
                        rest.append(job)
                self._pending = rest
                self._running = batch
                return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            t0 = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not kill the server
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.fail(f"generation failed: {type(e).__name__}: {e}")
            with self._cv:
                self._running = []
                self.stats["batches"] += 1
                for job in batch:
                    self.stats["generated_tokens"] += len(job.text.ids) if job.text else 0
                    if job.cancelled and not job.finished:  # its row was still running when the batch ended
                        job.outcome = "cancelled"
                    job.fail("generation ended early")  # no-op unless generate() stopped before our criterion
                    self.stats[job.outcome] += 1
            log.info("batch of %d done in %.2f s", len(batch), time.perf_counter() - t0)

    def _generate(self, batch: list[Job]) -> None:
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, job in enumerate(batch):  # left padding: every row's last prompt token in the last column
            n = len(job.prompt_ids)
            ids[i, width - n :] = torch.tensor(job.prompt_ids)
            mask[i, width - n :] = 1
            job.start(self._decode)
        s = batch[0].sampling
        if s.temperature > 0:
            sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            sampling = dict(do_sample=False)
        if s.seed is not None and s.temperature > 0:  # seeded sampling runs alone (batch_key None), so this stream is theirs
            torch.manual_seed(s.seed)
        device = self.model.device
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=max(j.sampling.max_tokens for j in batch),
                                stopping_criteria=StoppingCriteriaList([_Rows(batch, self.eos)]),
                                pad_token_id=self.pad, eos_token_id=sorted(self.eos), **sampling)
