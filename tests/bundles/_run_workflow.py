"""Run a bundle's train config (lvmmed_pretrain, lvmmed_seg) through MONAI's ConfigWorkflow, recording every
iteration's scalar outputs.

    python _run_workflow.py CONFIG RECORD.jsonl KILL_AT OVERRIDES_JSON

Appends one JSON line per iteration to RECORD.jsonl. KILL_AT > 0: the process kills itself with SIGKILL right
after that iteration (after the checkpoint handlers ran); KILL_AT < 0: with SIGKILL in the middle of writing the
first checkpoint of iteration -KILL_AT (half its bytes on disk). A hard interruption: nothing is cleaned up.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow


def _scalar(value: object) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def main() -> None:
    config, record, kill_at, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    workflow = ConfigWorkflow(config_file=config, workflow_type=None, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine) -> None:
        output = engine.state.output  # SupervisedTrainer: one dict per item, the loss repeated in each
        output = output[0] if isinstance(output, list) else output
        out = {k: float(v) for k, v in output.items() if k != "images_per_s" and _scalar(v)}
        with open(record, "a") as fh:
            fh.write(json.dumps({"iteration": engine.state.iteration, **out}) + "\n")
        if engine.state.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_at < 0:
        real_save = torch.save

        def save_and_die(obj, f, *args, **kwargs):  # the checkpoint savers call torch.save(obj, open file)
            if trainer.state.iteration == -kill_at and hasattr(f, "write"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save_and_die
    workflow.run()
    workflow.finalize()


if __name__ == "__main__":
    main()
