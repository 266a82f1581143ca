"""Where the embedded default model is: a checkout's weights/, or where `pip install .` put it."""
import sys
from pathlib import Path

NAME = "efddpm-shapes.safetensors"
CHECKOUT_MODEL = Path(__file__).resolve().parents[2] / "weights" / NAME
INSTALLED_MODEL = Path(sys.prefix) / "share" / "efddpm" / "weights" / NAME   # the wheel's data files
DEFAULT_MODEL = INSTALLED_MODEL if INSTALLED_MODEL.is_file() and not CHECKOUT_MODEL.is_file() else CHECKOUT_MODEL
