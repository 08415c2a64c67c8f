"""``python -m precise_lightning.tiny DIR``: write the tiny models under DIR (see the package docstring)."""

import argparse

from precise_lightning.tiny import write_tiny

parser = argparse.ArgumentParser(prog="python -m precise_lightning.tiny", description=__doc__)
parser.add_argument("directory", help="model root to write (created if missing), e.g. tiny_models")
root = write_tiny(parser.parse_args().directory)
print(f"tiny models written under {root}/ -- use them with model_root: {root} (configs/tiny_cpu.yaml)")
