"""One DataLoader for a whole cohort: the patches of every slide stream through the same worker processes.

A per-slide DataLoader pays its start (forking the workers, opening the slide) and its first batch, which nothing
overlaps, once per slide; on small slides (biopsies, a few hundred patches) that is a large share of the run. Here
the sampler is a generator that prepares slide after slide (tissue -> grid, in this process, as the loader asks for
more work) and yields one job per batch of patches; the workers read the jobs' patches, so the next slide's first
batches are read while this slide's last ones are encoded, and the workers start once per run.

Per slide the result is what the per-slide path gives (``slide_step.extract_slide``): the same patches in the same
order, encoded in the same batches, so the same features; slides come out in input order. A slide whose file fails
(when prepared here or read in a worker) comes out with its exception and the stream goes on with the next slide:
workers send a read error back as a value, never raise it, so each error belongs to its job's slide. Should the
loader itself break (a worker killed), the slide being read fails with that error and a fresh loader takes the
rest of the cohort.
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wsimil_core.devices import single_thread_worker
from wsimil_core.errors import SlideError
from wsimil_core.features.encoders import EncoderSpec, encode_tensor, module_device, preprocess_batch
from wsimil_core.features.slide_step import PreparedSlide
from wsimil_core.wsi.slide import open_slide

__all__ = ["BatchJob", "PatchBatches", "SlideFeatures", "iter_cohort_features"]

log = logging.getLogger("wsimil_core.features.extract")


class BatchJob(NamedTuple):
    """One batch to read (the sampler's index, pickled to a worker): ``coords`` int64 ``[B, 2]`` of slide number
    ``slide`` (its position in the stream)."""

    slide: int
    path: Path
    coords: np.ndarray
    size_level0: int
    patch_px: int
    slide_mpp: float | None
    backend: str


class PatchBatches(torch.utils.data.Dataset):
    """Reads :class:`BatchJob` s (``batch_size=None`` loaders): item ``job`` -> ``(job.slide, batch, error)`` with
    ``batch`` uint8 ``[B, patch_px, patch_px, 3]`` (RGB), or with ``spec`` the encoder's normalised float32 input
    ``[B, 3, S, S]`` (``encoders.preprocess_batch``), or ``None``, and ``error`` the exception the read raised
    (or ``None``). The last slide read stays open in the process that reads (each worker its own handle)."""

    def __init__(self, spec: EncoderSpec | None = None) -> None:
        self.spec = spec
        self._slide: Any = None
        self._path: Path | None = None

    def __len__(self) -> int:  # pragma: no cover - indexed by jobs only
        raise TypeError("PatchBatches is indexed by BatchJob, it has no length")

    def __getitem__(self, job: BatchJob) -> tuple[int, torch.Tensor | None, BaseException | None]:
        try:
            if self._path != job.path:
                self.close()
                self._slide = open_slide(job.path, backend=job.backend, slide_mpp=job.slide_mpp)
                self._path = job.path
            patches = [self._slide.read_patch(int(x), int(y), job.size_level0, job.patch_px) for x, y in job.coords]
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(patches), dtype=np.uint8))
            if self.spec is not None:
                batch = preprocess_batch(self.spec, batch)
            return job.slide, batch, None
        except Exception as exc:  # noqa: BLE001 - sent back as this job's slide's error
            return job.slide, None, _sendable(exc, job.path)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_slide": None, "_path": None}

    def close(self) -> None:
        if self._slide is not None:
            close = getattr(self._slide, "close", None)
            if close is not None:
                close()
        self._slide, self._path = None, None


def _sendable(exc: Exception, path: Path) -> BaseException:
    """``exc`` when it survives pickling (the worker -> main queue), else a ``SlideError`` with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling failure
        return SlideError(f"{path}: {type(exc).__name__}: {exc}")
    return exc


@dataclass
class SlideFeatures:
    """One slide out of the stream: ``features`` float32 ``[N, D]`` of ``prepared.coords`` (``N`` may be 0: no
    tissue), or ``error`` (then ``prepared`` may be None: the slide failed before its grid was known)."""

    path: Path
    sid: str
    prepared: PreparedSlide | None = None
    features: np.ndarray | None = None
    error: BaseException | None = None


@dataclass
class _Slide:
    """The stream's state of one slide: batches it has (``n_batches``), issued to the loader, received back."""

    out: SlideFeatures
    n_batches: int = 0
    issued: int = 0
    received: int = 0
    filled: int = 0
    bar: Any = None

    @property
    def finished(self) -> bool:
        """Nothing of this slide is still on its way: all its batches came back, or it failed and the batches
        issued before its error came back (none is issued after it)."""
        if self.out.error is not None:
            return self.received == self.issued
        return self.out.prepared is not None and self.received == self.n_batches


def iter_cohort_features(
    slides: Sequence[tuple[Path, str]],
    prepare: Callable[[Path, str], PreparedSlide],
    model: nn.Module,
    spec: EncoderSpec,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    amp: bool = True,
    slide_mpp: float | None = None,
    backend: str = "auto",
    progress: bool = True,
    normalise_in_workers: bool | None = None,
) -> Generator[SlideFeatures, None, None]:
    """Features of every slide of ``slides`` (``(path, slide id)`` pairs), one :class:`SlideFeatures` per slide in
    input order, through one DataLoader (``num_workers`` reader processes, 0 = read here) per run.

    ``prepare(path, sid)`` gives a slide's patches (``slide_step.prepare_slide``); it runs in this process when the
    loader needs the slide's first batch. Errors of a slide (raised by ``prepare``, by a read, or by the encoder
    on its batches) come out as that slide's ``error``; the stream goes on. Closing the generator early (``break``,
    an exception in the caller) stops the workers. ``normalise_in_workers`` (None = when the model is on the CPU
    and ``num_workers > 0``): the workers also turn the patches into the encoder's input, so the forward's process
    does nothing else; else uint8 batches travel and are normalised on the model's device (4x fewer bytes to a
    GPU). The features are the same either way.
    """
    start = 0
    while start < len(slides):
        stream = _LoaderStream(slides[start:], start, prepare, model, spec, batch_size, num_workers, amp, progress)
        stream.slide_mpp, stream.backend, stream.normalise_in_workers = slide_mpp, backend, normalise_in_workers
        yield from stream.run()
        if stream.broken is None:
            return
        start = stream.restart_at  # the loader broke: the failed slide came out, a fresh loader takes the rest


class _LoaderStream:
    """One DataLoader over ``slides`` (numbered from ``first``); see :func:`iter_cohort_features`."""

    def __init__(self, slides, first, prepare, model, spec, batch_size, num_workers, amp, progress) -> None:
        self.slides, self.first, self.prepare = list(slides), int(first), prepare
        self.model, self.spec, self.amp, self.progress = model, spec, amp, progress
        self.batch_size, self.num_workers = max(1, int(batch_size)), max(0, int(num_workers))
        self.slide_mpp: float | None = None
        self.backend = "auto"
        self.normalise_in_workers: bool | None = None
        self.states: list[_Slide] = []
        self.pending: deque[int] = deque()  # slide number (0-based here) of each job issued and not yet received
        self.next_out = 0
        self.broken: BaseException | None = None
        self.restart_at = len(slides) + first

    def jobs(self) -> Iterator[BatchJob]:
        """The sampler: prepares slide after slide and yields their batches (never raises a slide's error)."""
        for k, (path, sid) in enumerate(self.slides):
            st = _Slide(SlideFeatures(Path(path), sid))
            self.states.append(st)
            try:
                prepared = self.prepare(Path(path), sid)
            except Exception as exc:  # noqa: BLE001 - the slide's error, reported in order by the consumer
                st.out.error = exc
                continue
            st.out.prepared = prepared
            n = len(prepared.coords)
            st.n_batches = -(-n // self.batch_size)
            st.out.features = np.empty((n, self.spec.dim), dtype=np.float32)
            for b in range(st.n_batches):
                if st.out.error is not None:  # a batch of this slide failed: read no more of it
                    break
                st.issued += 1
                self.pending.append(k)
                yield BatchJob(
                    self.first + k,
                    Path(path),
                    prepared.coords[b * self.batch_size : (b + 1) * self.batch_size],
                    prepared.size_level0,
                    prepared.patch_px,
                    self.slide_mpp,
                    self.backend,
                )

    def ready(self) -> Iterator[SlideFeatures]:
        """The finished slides at the head of the stream, in order."""
        while self.next_out < len(self.states) and self.states[self.next_out].finished:
            st = self.states[self.next_out]
            self.next_out += 1
            if st.bar is not None:
                st.bar.close()
            if st.out.error is not None:
                st.out.features = None
            yield st.out

    @torch.inference_mode()
    def run(self) -> Iterator[SlideFeatures]:
        device = module_device(self.model)
        in_workers = self.normalise_in_workers
        if in_workers is None:
            in_workers = self.num_workers > 0 and device.type == "cpu"
        loader = torch.utils.data.DataLoader(
            PatchBatches(self.spec if in_workers else None),
            batch_size=None,
            sampler=self.jobs(),  # an iterable of BatchJob indices
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=single_thread_worker if self.num_workers > 0 else None,
        )
        it: Any = iter(loader)
        try:
            while True:
                try:
                    k_abs, patches, error = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - the loader itself broke (a worker died)
                    self.fail_loader(exc)
                    yield from self.ready()
                    return
                k = k_abs - self.first
                if self.pending.popleft() != k:  # pragma: no cover - DataLoader keeps the sampler's order
                    raise RuntimeError("extraction stream: a batch came back out of order")
                st = self.states[k]
                st.received += 1
                if st.out.error is None:
                    if error is not None:
                        st.out.error = error
                    else:
                        self.encode(st, patches, device)
                yield from self.ready()
            yield from self.ready()
        finally:
            it = None  # drops the iterator: its workers stop now, also when the caller stops early
            for st in self.states:
                if st.bar is not None:
                    st.bar.close()

    def encode(self, st: _Slide, patches: torch.Tensor, device: torch.device) -> None:
        """Encode one batch of ``st`` into its features; an error becomes the slide's error."""
        try:
            x = patches if patches.is_floating_point() else preprocess_batch(self.spec, patches, device)
            feats = encode_tensor(self.model, x, amp=self.amp).float().cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one slide's batch
            st.out.error = exc
            return
        assert st.out.features is not None
        st.out.features[st.filled : st.filled + len(feats)] = feats
        st.filled += len(feats)
        if st.bar is None:
            st.bar = tqdm(
                total=len(st.out.features), desc=st.out.sid, unit="patch", leave=False, disable=not self.progress
            )
        st.bar.update(len(feats))

    def fail_loader(self, exc: BaseException) -> None:
        """The loader broke: the oldest unfinished slide fails with ``exc``; the slides after it start again."""
        k = self.pending[0] if self.pending else self.next_out
        log.debug("extraction stream: the DataLoader broke at slide %d", self.first + k, exc_info=exc)
        self.broken = exc
        if k >= len(self.slides):  # nothing left to read
            return
        if k < len(self.states):
            st = self.states[k]
        else:
            st = _Slide(SlideFeatures(Path(self.slides[k][0]), self.slides[k][1]))
            self.states.append(st)
        if st.out.error is None:
            st.out.error = exc
        st.issued = st.received
        del self.states[k + 1 :]
        self.restart_at = self.first + k + 1
