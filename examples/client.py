"""A client app, as a shop would write it: publish items and events, print the pushes.

recsys-agent run            # in one terminal (embedded NATS on 4222)
export NATS_URL=$(recsys-agent nats-credentials)   # the embedded server asks for credentials
python examples/client.py   # in another
"""

from __future__ import annotations

import asyncio
import os
import uuid

import nats
import orjson

ITEMS = [
    {"id": "tent", "title": "Two-person tent", "categories": ["camping"]},
    {"id": "stove", "title": "Camping stove", "categories": ["camping", "cooking"]},
    {"id": "pan", "title": "Cast iron pan", "categories": ["cooking"]},
    {"id": "boots", "title": "Hiking boots", "categories": ["hiking"]},
    {"id": "poles", "title": "Trekking poles", "categories": ["hiking"]},
]


async def main() -> None:
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    js = nc.jetstream()

    async def show(msg: nats.aio.msg.Msg) -> None:
        body = orjson.loads(msg.data)
        top = ", ".join(f"{i['item_id']} ({'; '.join(i['reasons'])})" for i in body["items"][:3])
        print(f"push for {body['user_id']} after {body.get('event_ids')}: {top}")

    await nc.subscribe("recsys.recs.alice", cb=show)
    await js.publish("recsys.catalog.upsert", orjson.dumps(ITEMS))
    # ids unique to this run: the agent remembers ids across restarts, and a repeated id is a
    # duplicate, which is counted once and gets no push
    run = uuid.uuid4().hex[:8]
    for n, item in enumerate(["tent", "boots"]):
        event = {"id": f"demo-{run}-{n}", "type": "view", "user_id": "alice", "item_id": item}
        # wire contract v2: recsys.events.<type>.<user_token>; "alice" is its own token (ids
        # with other characters travel as "~" + URL-safe base64 of their UTF-8, no padding)
        await js.publish("recsys.events.view.alice", orjson.dumps(event))
        await asyncio.sleep(0.5)
    reply = await nc.request("recsys.recommend", orjson.dumps({"user_id": "alice", "k": 3}), timeout=5)
    print("pull:", orjson.loads(reply.data)["items"])
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
