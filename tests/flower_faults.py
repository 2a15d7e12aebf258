"""A Flower client mod that injects faults into fadcore's ClientApp (tests only).

The test writes a JSON fault spec to the file named by ``FAD_TEST_FLOWER_FAULTS`` (set before
the simulation starts, so the Ray actors inherit it): ``{"partition": p, "round": r,
"sleep": seconds}`` makes the node of partition p sleep that long before answering round r of
a ``query.fad`` message (a node that times out or has gone away). An empty file: no faults.
"""

from __future__ import annotations

import json
import os
import time


def spec() -> dict:
    path = os.environ.get("FAD_TEST_FLOWER_FAULTS", "")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text else {}


def fault_mod(msg, context, call_next):
    s = spec()
    if s and msg.metadata.message_type == "query.fad":
        cfg = msg.content.config_records["fad"]
        if (int(context.node_config.get("partition-id", -1)) == s["partition"]
                and int(cfg["round"]) == s["round"]):
            time.sleep(float(s["sleep"]))
    return call_next(msg, context)
