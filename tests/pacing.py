"""A callback for tests that signal a running fit from outside (``class_path: pacing.Pacing``, with ``tests`` on
PYTHONPATH): after each rollout it writes the rollout count to ``path`` and pauses, so that a signal sent once the
count reaches some value lands inside a known stretch of the run. It changes nothing the run computes."""

import time
from pathlib import Path

from lightning.pytorch import Callback


class Pacing(Callback):
    def __init__(self, path: str, pause: float = 0.3) -> None:
        self.path, self.pause = Path(path), pause

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.is_global_zero:  # written whole (a reader polling the file never sees it empty)
            partial = self.path.with_suffix(".partial")
            partial.write_text(str(pl_module.rollouts))
            partial.replace(self.path)
        time.sleep(self.pause)
