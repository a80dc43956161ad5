"""Run the lvmmed_pretrain train config through MONAI's ConfigWorkflow, recording every iteration's output.

    python _run_workflow.py CONFIG RECORD.jsonl KILL_AT OVERRIDES_JSON

Appends one JSON line per iteration to RECORD.jsonl; with KILL_AT > 0 the process kills itself with SIGKILL
right after that iteration (after the checkpoint handlers ran): a hard interruption, nothing is cleaned up.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from ignite.engine import Events
from monai.bundle import ConfigWorkflow


def main() -> None:
    config, record, kill_at, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    workflow = ConfigWorkflow(config_file=config, workflow_type=None, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine) -> None:
        out = {k: float(v) for k, v in engine.state.output.items() if k != "images_per_s"}
        with open(record, "a") as fh:
            fh.write(json.dumps({"iteration": engine.state.iteration, **out}) + "\n")
        if engine.state.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    workflow.run()
    workflow.finalize()


if __name__ == "__main__":
    main()
