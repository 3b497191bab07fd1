"""One training round, in torch (the worker process runs it).

The round's events become each user's sequence of items in time order. Events that share a
timestamp (the lines of one basket, a burst of ratings) come in no order of their own: they are
shuffled within their step, so that the model cannot learn an order the data does not have
(the replay's tie order is by item id). Each sequence is cut into windows of ``max_length``
items; every position is trained to score the next item above sampled negatives (a sampled
softmax over the target and ``negatives`` items drawn uniformly from every item of the round,
those known only by their text included).

A round starts from the previous version's arrays when there is one (the id embeddings of items
still in the window are kept), so that each round refines rather than relearns.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional

from plugins.sequence.model import NextItemModel
from plugins.sequence.stream import TrainingJob, TrainingResult

PAD = -1
# A round's gradient steps are bounded: beyond this many windows an epoch trains on a random
# sample of them, so that a round's time stays bounded however long the users' histories are.
MAX_EXAMPLES = 40_000


def training_windows(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, max_length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (windows, max_length), left-padded with ``PAD``: every user's items
    in time order, ties shuffled, cut into windows whose targets do not overlap, newest first."""
    order = np.lexsort((rng.random(len(users)), ts, users))
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        sequence = items[start:end]
        stop = len(sequence)
        while stop >= 2:
            first = max(0, stop - 1 - max_length)
            window_in = np.full(max_length, PAD, dtype=np.int64)
            window_out = np.full(max_length, PAD, dtype=np.int64)
            count = stop - 1 - first
            window_in[max_length - count :] = sequence[first : stop - 1]
            window_out[max_length - count :] = sequence[first + 1 : stop]
            inputs.append(window_in)
            targets.append(window_out)
            stop = first + 1
    if not inputs:
        empty = np.zeros((0, max_length), dtype=np.int64)
        return empty, empty
    return np.stack(inputs), np.stack(targets)


def train(job: TrainingJob) -> TrainingResult:
    started, cpu_started = time.perf_counter(), time.process_time()
    settings, shape = job.settings, job.shape
    rng = np.random.default_rng((settings.seed, job.version))
    torch.manual_seed(settings.seed * 1_000_003 + job.version)
    inputs, targets = training_windows(job.users, job.items, job.ts, shape.max_length, rng)
    n_items, text_dim = job.text.shape
    model = NextItemModel(shape, max(job.n_window, 1), text_dim, settings.dropout)
    if job.warm is not None:
        model.load_numpy(job.warm, job.warm_rows)
    text = torch.from_numpy(job.text)
    has_text = torch.from_numpy(job.has_text.astype(np.float32))
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    model.train()
    steps, losses = 0, []
    windows = min(len(inputs), MAX_EXAMPLES)
    batches = -(-windows // settings.batch_size)
    epochs = max(settings.epochs, -(-settings.min_steps // batches)) if batches else 0
    for _ in range(epochs):
        chosen = rng.permutation(len(inputs))[:windows]
        for batch in np.array_split(chosen, batches):
            negatives = rng.integers(0, n_items, settings.negatives)
            loss = _step(model, inputs[batch], targets[batch], negatives, text, has_text, job, rng)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
            losses.append(float(loss.detach()))
    model.eval()
    return TrainingResult(
        params=model.to_numpy(),
        examples=len(inputs),
        steps=steps,
        loss=float(np.mean(losses[-20:])) if losses else float("nan"),
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )


def _step(
    model: NextItemModel,
    inputs: np.ndarray,
    targets: np.ndarray,
    negatives: np.ndarray,
    text: torch.Tensor,
    has_text: torch.Tensor,
    job: TrainingJob,
    rng: np.random.Generator,
) -> torch.Tensor:
    """The sampled-softmax loss of one batch of windows."""
    # the rows of only the items this batch names: a few thousand, not the catalog
    named = np.concatenate([inputs[inputs != PAD], targets[targets != PAD], negatives])
    used = np.unique(named)
    local = np.full(int(used.max()) + 2, len(used), dtype=np.int64)  # PAD (-1) -> the zero row
    local[used] = np.arange(len(used))
    # some items are seen by their text alone, as an item no event has named yet will be
    text_of_used = has_text[torch.from_numpy(used)]
    keep_id = (used < job.n_window) & ~((rng.random(len(used)) < job.settings.id_dropout) & (text_of_used.numpy() > 0))
    used_t = torch.from_numpy(used)
    rows = model.item_rows(used_t, torch.from_numpy(keep_id.astype(np.float32)), text[used_t], text_of_used)
    rows = torch.cat([rows, rows.new_zeros((1, rows.shape[1]))])
    input_index = torch.from_numpy(local[inputs])
    hidden = model.encode(rows[input_index], torch.from_numpy(inputs != PAD))
    wanted = torch.from_numpy(targets != PAD)
    users = hidden[wanted]
    target_items = torch.from_numpy(targets)[wanted]
    positive = (users * rows[torch.from_numpy(local[targets])[wanted]]).sum(-1, keepdim=True)
    negative = users @ rows[torch.from_numpy(local[negatives])].T
    # a negative that is the target is no negative
    negative = negative.masked_fill(torch.from_numpy(negatives)[None, :] == target_items[:, None], -1e9)
    logits = torch.cat([positive, negative], dim=1)
    return functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.int64))
