"""The sequence plugin's options (``[plugins.sequence]``) and the model's shape."""

from __future__ import annotations

from dataclasses import dataclass

TRAINING_MODES = ("background", "inline")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What fixes the arrays of a version: a loaded version of another shape is refused."""

    dim: int
    heads: int
    blocks: int
    max_length: int


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    """How one training round runs (in the worker process)."""

    epochs: int
    # a round on little data repeats its epochs until it has taken this many steps
    min_steps: int
    batch_size: int
    negatives: int
    learning_rate: float
    dropout: float
    # share of the items of a training batch that are seen by their text alone, as an item
    # that no event has named yet is at serving time
    id_dropout: float
    seed: int


@dataclass(frozen=True, slots=True)
class SequenceOptions:
    # off: registered, but it neither trains nor proposes
    enabled: bool = False
    # a training round after this many new positive events...
    every_events: int = 10_000
    # ...or after this many seconds of wall time with at least ``min_events`` new ones (live
    # only: under a replay's event clock only the event count paces the rounds); 0: never
    every_s: float = 600.0
    min_events: int = 1_000
    # a round trains on the latest this many positive events
    window_events: int = 50_000
    # "background": rounds run in the worker process while the agent serves the previous
    # version; "inline": the event that triggers a round waits for it (replays that do not
    # call Pipeline.settle(); the time is then counted where the event's apply is)
    training: str = "background"
    dim: int = 64
    heads: int = 2
    blocks: int = 1
    max_length: int = 30
    epochs: int = 1
    min_steps: int = 200
    batch_size: int = 128
    negatives: int = 256
    learning_rate: float = 2e-3
    dropout: float = 0.1
    id_dropout: float = 0.25
    seed: int = 0
    # the worker process's niceness: the hot path keeps the cores it needs
    nice: int = 10
    # several agents on one NATS: how often a loader looks for a new version, and how long a
    # trainer's claim lasts without renewal before another agent takes over
    poll_s: float = 5.0
    lease_s: float = 60.0

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.dim, self.heads, self.blocks, self.max_length)

    @property
    def settings(self) -> TrainingSettings:
        return TrainingSettings(
            self.epochs,
            self.min_steps,
            self.batch_size,
            self.negatives,
            self.learning_rate,
            self.dropout,
            self.id_dropout,
            self.seed,
        )

    def problems(self) -> list[tuple[str, str]]:
        return [
            (name, message)
            for name, bad, message in (
                ("every_events", self.every_events < 1, "must be at least 1"),
                ("every_s", self.every_s < 0, "must be 0 (never) or a positive number of seconds"),
                ("min_events", self.min_events < 1, "must be at least 1"),
                ("window_events", self.window_events < 2, "must be at least 2"),
                ("training", self.training not in TRAINING_MODES, f"must be one of {', '.join(TRAINING_MODES)}"),
                ("dim", self.dim < 2 or self.dim % max(self.heads, 1), "must be at least 2 and a multiple of heads"),
                ("heads", self.heads < 1, "must be at least 1"),
                ("blocks", self.blocks < 1, "must be at least 1"),
                ("max_length", self.max_length < 2, "must be at least 2"),
                ("epochs", self.epochs < 1, "must be at least 1"),
                ("min_steps", self.min_steps < 0, "must be at least 0"),
                ("batch_size", self.batch_size < 1, "must be at least 1"),
                ("negatives", self.negatives < 1, "must be at least 1"),
                ("learning_rate", not 0 < self.learning_rate <= 1, "must be in (0, 1]"),
                ("dropout", not 0 <= self.dropout < 1, "must be in [0, 1)"),
                ("id_dropout", not 0 <= self.id_dropout < 1, "must be in [0, 1)"),
                ("nice", not 0 <= self.nice <= 19, "must be in 0..19"),
                ("poll_s", self.poll_s <= 0, "must be positive"),
                ("lease_s", self.lease_s <= self.poll_s, "must be longer than poll_s"),
            )
            if bad
        ]
