"""Data phases of one run: which datasets, in which input order, feed each optimizer step.

A run is cut into *phases* at every data-phase start (``data.phases``, e.g. Kale from step 0 then
OCR-200m from step 250000) and at every DOT order switch (``data.orders: [ti, it]``). Each phase builds
its own streaming loader when it begins (closing the previous one), so it reads its datasets from their
start: both orders of a DOT stage read the same samples in the same sequence, and a new data phase
begins at the first shuffled sample of its datasets. The optimizer and the LR schedule belong to the
trainer and do not notice a switch.

A loader that cannot go on — a download failed past ``data.download_retry`` (a missing shard, storage
down for longer than the retry window), a loader worker died — ends the process with one line saying
why (:func:`pipeline.data.remote.exit_on_storage_error`) instead of a traceback per rank, a hang or
an epoch that ends early.

Resume: :meth:`PhasedLoader.state_dict` names the phase and holds its loader's streaming state.
Loaded at a step of that phase, the loader continues at the exact sample; loaded at the first step of a
later phase (a checkpoint taken right at the end of the previous one), that phase starts fresh.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any, Callable

from pipeline.config import Config, ConfigError, DataPhase, data_phases
from pipeline.data import remote
from pipeline.data.dot import TEXT_FIRST, TI_PT_IMAGE, DotSchedule, prompt_suffix_tokens, to_text_first


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``[start_step, end_step)`` of the run: one data phase in one input order."""

    name: str
    start_step: int
    end_step: int
    data: DataPhase
    order: str


def plan_phases(config: Config) -> list[Phase]:
    """The run's phases in step order: one per data phase, or one per DOT order of the single data phase."""
    data, orders, total = data_phases(config.data), config.data.orders, config.train.total_steps
    if len(orders) == 1:
        ends = [p.start_step for p in data[1:]] + [total]
        return [Phase(p.name, p.start_step, end, p, orders[0]) for p, end in zip(data, ends)]
    dot = DotSchedule(list(orders), total)
    starts = dot.start_steps()
    return [Phase(f"{data[0].name}/{order}", start, end, data[0], order)
            for order, start, end in zip(orders, starts, starts[1:] + [total])]


class PhasedLoader:
    """Micro-batches for any step of the run, from the loader of that step's phase.

    ``on_start(info)`` is called when a phase's loader is built, with what it reads (phase, steps, order,
    streams with their size and samples per epoch): the trainer records it in the run's metrics.
    """

    def __init__(self, config: Config, tokenizer: Any, image_processor: Any = None,
                 on_start: Callable[[dict[str, Any]], None] | None = None):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        remote.configure_retries(config.data.download_retry, config.data.download_timeout)
        self.phases = plan_phases(config)
        self.on_start = on_start
        text_first = any(p.order == TEXT_FIRST for p in self.phases)
        layout = config.model.text_layout
        self.tails = (prompt_suffix_tokens(tokenizer, layout), TI_PT_IMAGE[config.data.ti_pt_image](tokenizer, layout)) \
            if text_first else (0, 0)
        self.index: int | None = None
        self.loader = self.batches = None
        self.pending: dict[str, Any] | None = None

    def phase_at(self, step: int) -> int:
        """Index of the phase of optimizer step ``step`` (0-based)."""
        return max(i for i, p in enumerate(self.phases) if p.start_step <= step)

    def micro_batches(self, step: int, count: int) -> list[dict[str, Any]]:
        """The next ``count`` micro-batches for step ``step``, in the phase's input order (a loader that
        fails for good ends the process: see the module docstring)."""
        try:
            return self._micro_batches(step, count)
        except remote.RemoteError as err:  # a worker's arrives as "...\npipeline.data.remote.RemoteError: <line>"
            remote.exit_on_storage_error(_last_line(err).split("RemoteError: ", 1)[-1])
        except RuntimeError as err:        # raised by torch (a worker died) or streaming (an index never came)
            message = _last_line(err)
            if type(err) is RuntimeError and ("DataLoader worker" in message or "download" in message):
                remote.exit_on_storage_error(f"the data loader stopped: {message}",
                                             remote.EXIT_STORAGE if "download" in message else 1)
            raise

    def _micro_batches(self, step: int, count: int) -> list[dict[str, Any]]:
        self._enter(self.phase_at(step))
        phase, out = self.phases[self.index], []
        for _ in range(count):
            try:
                batch = next(self.batches)
            except StopIteration:           # end of an epoch: streaming starts the next one
                self.batches = iter(self.loader)
                batch = next(self.batches)
            out.append(to_text_first(batch, *self.tails) if phase.order == TEXT_FIRST else batch)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"phase": name, "loader": streaming state}`` of the phase being read."""
        if self.index is None:
            return self.pending or {"phase": self.phases[0].name, "loader": None}
        return {"phase": self.phases[self.index].name, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Resume at ``step`` from :meth:`state_dict` (the loader is built at the next :meth:`micro_batches`)."""
        names = [p.name for p in self.phases]
        if "phase" not in state:            # saved before data phases existed: a streaming state of one phase
            state = {"phase": names[0], "loader": state}
        if state.get("phase") not in names:
            raise ConfigError(f"the checkpoint's data loader is in phase {state.get('phase')!r}, which this recipe "
                              f"does not have (phases: {names}); resume with the recipe the run was started with")
        saved, now = names.index(state["phase"]), self.phase_at(step)
        if saved > now:
            raise ConfigError(f"the checkpoint at step {step} is in data phase {state['phase']!r}, which starts at "
                              f"step {self.phases[saved].start_step}; the recipe's phases do not match the run's")
        self.pending = state if saved == now else None

    def _enter(self, index: int) -> None:
        if index == self.index:
            return
        from pipeline.data.dataset import build_dataloader

        self.close()
        phase = self.phases[index]
        self.loader = build_dataloader(self.config, self.tokenizer, self.image_processor, phase=phase.data)
        resumed = self.pending is not None and self.pending["loader"] is not None
        if resumed:
            self.loader.load_state_dict(self.pending["loader"])
        self.pending, self.index, self.batches = None, index, iter(self.loader)
        if self.on_start is not None:
            dataset = self.loader.dataset
            streams = [{"path": s.local, "samples": int(n), "per_epoch": int(s.choose)}
                       for s, n in zip(dataset.streams, dataset.samples_per_stream.tolist())]
            self.on_start({"phase": phase.name, "start_step": phase.start_step, "end_step": phase.end_step,
                           "order": phase.order, "resumed": resumed, "epoch_samples": int(dataset.epoch_size),
                           "streams": streams})

    def close(self) -> None:
        """Drop the current phase's loader, so its streaming dataset releases its folders (shared memory)."""
        self.batches = self.loader = None
        self.index = None
        gc.collect()


def _last_line(err: BaseException) -> str:
    """The last line of an error's message (a loader worker's error arrives with its traceback above it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


__all__ = ["Phase", "PhasedLoader", "plan_phases"]
