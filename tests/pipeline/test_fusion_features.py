"""The fusion's per-weight (AdaGrad) steps, its two learners and the choice between them, and
their snapshot."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from agent.app import Agent
from agent.config import Settings
from agent.pipeline.catalog import Catalog
from agent.pipeline.user_state import UserState, UserStore
from agent.pipeline.values import Candidates, Query
from plugins.fusion import (
    SELECTION_KEY,
    SLOW_SHARE,
    SNAPSHOT_KEY,
    SQUARES_KEY,
    SWITCH_EVIDENCE,
    SWITCH_MARGIN,
    LearnedFusion,
)
from tests.builders import Client


def held_user(users: UserStore, user_id: str, event_count: int) -> UserState:
    user = UserState(user_id=user_id, recent=deque(maxlen=50))
    user.event_count = event_count
    users._users[user_id] = user  # the agent holds this user
    return user


def query(user: UserState, k: int = 3) -> Query:
    return Query(user=user, k=k, now=0.0, catalog=Catalog(), n_candidates=10)


def test_every_weight_takes_its_own_step_size_from_its_gradients() -> None:
    # AdaGrad: a weight's first step is the learning rate whatever its gradient's size (a
    # source whose features barely tell the chosen item apart still moves), and its steps
    # shrink as its squared gradients add up. Plain gradient steps would be proportional to
    # each gradient instead.
    users = UserStore(50, 100)
    plugin = LearnedFusion()
    plugin._users = users
    user = held_user(users, "u", 30)
    steps = []
    for _ in range(6):
        plugin.recsys_fuse(
            query(user),
            [
                Candidates("right", np.array([1, 2, 3, 4, 5]), np.array([5.0, 4.0, 3.0, 2.0, 1.0]), "x"),
                # puts the chosen item second only: its gradient is a fraction of "right"'s
                Candidates("close", np.array([2, 5, 1, 3, 4]), np.array([5.0, 4.0, 3.0, 2.0, 1.0]), "y"),
            ],
        )
        sources = plugin.pending["u"].sources
        before = dict(plugin.weights["long"])
        plugin.recsys_apply_event(user, 5, 1.0)
        steps.append({f: plugin.weights["long"][f] - before[f] for f in sources})
    assert plugin.feedbacks == 6
    first = steps[0]
    rate = plugin.learning_rate
    squares = plugin.squares["long"]
    assert squares["close"] != squares["right"], "the gradients differ in size"
    assert abs(first["right"]) == pytest.approx(rate, rel=1e-6)
    assert abs(first["close"]) == pytest.approx(rate, rel=1e-6), "a small gradient's step is as large"
    assert abs(steps[-1]["right"]) < abs(first["right"]), "steps shrink as squared gradients add up"
    assert set(squares) == set(plugin.weights["long"])


def test_both_learners_learn_from_every_choice_each_against_its_own_negatives() -> None:
    users = UserStore(50, 100)
    plugin = LearnedFusion()
    plugin._users = users
    user = held_user(users, "u", 30)
    plugin.recsys_fuse(
        query(user),
        [
            # 60 candidates: 20 uniform draws leave most of them out of the sample
            Candidates("right", np.arange(1, 61), np.arange(60, 0, -1, dtype=float), "x"),
            Candidates("wrong", np.arange(60, 0, -1), np.arange(60, 0, -1, dtype=float), "y"),
        ],
    )
    ranking = plugin.pending["u"]
    assert set(ranking.sampled) <= set(ranking.shown), "the shown list and the sample, or the sample alone"
    assert len(ranking.sampled) < len(ranking.shown) < 60
    # what the user was shown, best first: the fused list's top k (3), all among the negatives
    assert len(ranking.listed) == 3 and set(ranking.listed) <= set(ranking.shown)
    before = {name: dict(learner.weights["long"]) for name, learner in plugin.learners.items()}
    plugin.recsys_apply_event(user, 2, 1.0)
    moved = {}
    for name, learner in plugin.learners.items():
        assert learner.weights["long"]["right"] > before[name]["right"], name
        assert learner.weights["long"]["wrong"] < before[name]["wrong"], name
        moved[name] = learner.weights["long"]["right"] - before[name]["right"]
    # a slow learner takes its share of the step its full-rate twin takes
    for name in ("shown", "sampled"):
        assert moved[f"{name}_slow"] == pytest.approx(SLOW_SHARE * moved[name]), name
    assert plugin.weights["long"] is plugin.learners["shown"].weights["long"], "the first learner serves at first"


def _gains(shown: float, sampled: float, slow: float = 0.0) -> dict[str, float]:
    """One feedback's gains for every learner: the two at the full rate, the slow ones at ``slow``."""
    return {"shown": shown, "sampled": sampled, "shown_slow": slow, "sampled_slow": slow}


def test_a_segment_serves_the_other_learner_once_it_leads_clearly_on_enough_evidence() -> None:
    plugin = LearnedFusion()
    plugin._weight_list("long", ["right", "wrong"])
    plugin._weight_list("new", ["right", "wrong"])
    # a lead within the margin changes nothing, however long it lasts
    for _ in range(3 * int(SWITCH_EVIDENCE)):
        plugin._judge("new", _gains(0.500, 0.500 * (1.0 + SWITCH_MARGIN / 2)))
    assert plugin.serving["new"] == "shown"
    # a clear lead switches the segment, not before the evidence is there
    for feedback in range(3 * int(SWITCH_EVIDENCE)):
        plugin._judge("long", _gains(0.30, 0.40))
        if feedback < SWITCH_EVIDENCE - 1:
            assert plugin.serving["long"] == "shown"
    assert plugin.serving["long"] == "sampled" and plugin.serving["new"] == "shown"
    assert plugin.weights["long"] is plugin.learners["sampled"].weights["long"]
    # and back, once the first learner leads clearly again
    for _ in range(5 * int(SWITCH_EVIDENCE)):
        plugin._judge("long", _gains(0.50, 0.30))
    assert plugin.serving["long"] == "shown"
    # a slow learner serves like any other once it leads (from nothing: it takes longer)
    for _ in range(10 * int(SWITCH_EVIDENCE)):
        plugin._judge("long", _gains(0.40, 0.30, slow=0.45))
    assert plugin.serving["long"] == "shown_slow"
    assert plugin.weights["long"] is plugin.learners["shown_slow"].weights["long"]


async def test_which_learner_each_segment_serves_survives_a_restart(settings: Settings, client: Client) -> None:
    async with Agent(settings) as agent:
        fusion = agent.pm.get_plugin("fusion")
        fusion._weight_list("long", ["trending"])
        fusion.learners["sampled"].weights["long"]["trending"] = 0.75
        fusion._serve("long", "sampled")
    async with Agent(settings) as agent:
        fusion = agent.pm.get_plugin("fusion")
        assert fusion.serving == {"long": "sampled"} and fusion.weights["long"] == {"trending": 0.75}
        assert fusion.learners["shown"].weights["long"] == {"trending": 1.0}


async def test_a_snapshot_from_before_the_adagrad_sums_or_with_unknown_features_still_starts(
    settings: Settings, client: Client
) -> None:
    kv = await client.js.create_key_value(bucket=f"{settings.stream_name}_STATE", history=1)
    # weights saved by a fusion without squared-gradient sums, one feature it never knew
    await kv.put(SNAPSHOT_KEY, json.dumps({"long": {"trending": 0.5, "gone@rank": 2.0}}).encode())
    await kv.put(SQUARES_KEY, b"[not a table]")
    # and a selection of the wrong shapes: dropped, the start goes on
    await kv.put(SELECTION_KEY, json.dumps({"serving": {"long": [1], "new": "nobody"}, "evidence": "x"}).encode())
    async with Agent(settings) as agent:
        fusion = agent.pm.get_plugin("fusion")
        assert fusion.weights["long"] == {"trending": 0.5, "gone@rank": 2.0}
        assert fusion.squares == {} and fusion.serving == {"long": "shown"} and fusion.evidence == {}
        # the first learner's sums are the ones saved under the key of a single learner
        fusion.learners["shown"].squares["long"] = {"trending": 3.0}
    async with Agent(settings) as agent:
        assert agent.pm.get_plugin("fusion").squares == {"long": {"trending": 3.0}}
