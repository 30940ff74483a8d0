"""llmgen: prepare, pretrain, finetune, eval and generate with decoder-only language models.

The library is the Python API (this module re-exports the entry points); the `llmgen` command is a
thin layer over it.
"""

from llmgen.config import Config, load_config
from llmgen.errors import LlmgenError
from llmgen.version import __version__

__all__ = ["Config", "LlmgenError", "load_config", "__version__"]
