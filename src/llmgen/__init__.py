"""llmgen: prepare, pretrain, finetune, eval and generate with decoder-only language models.

The library is the Python API; the `llmgen` command is a thin layer over it.
"""

__version__ = "0.1.0"

from llmgen.config import Config, load_config  # noqa: E402
from llmgen.errors import LlmgenError  # noqa: E402

__all__ = ["Config", "LlmgenError", "load_config", "__version__"]
