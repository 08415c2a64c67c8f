"""precise-lightning command line: ``python cli.py fit --config configs/digits_precise.yaml``.

See :mod:`precise_lightning.cli` (``fit`` / ``validate`` / ``test``, stacked ``--config`` files, dotted overrides,
``--print_config``).
"""

from precise_lightning.cli import main, run  # noqa: F401 - main for scripts and tests that drive the CLI

if __name__ == "__main__":
    run()
