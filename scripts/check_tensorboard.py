#!/usr/bin/env python3
"""Reads a TensorBoard log directory with the `tensorboard` package's event reader, the reference
for the event files train and long-context write.

usage: check_tensorboard.py LOGDIR   prints {"tag": [[step, value, wall_time], ...], ...} as JSON
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    accumulator = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {
        tag: [[event.step, event.value, event.wall_time] for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
