"""hscr_fast: Hierarchical Self-Contrastive Rewarding for medical vision-language models.

Importing the package is cheap on purpose: transformers, peft and deepspeed are imported by the submodules that use
them (`hscr_fast.models`, `hscr_fast.training`, ...), never here.
"""

from hscr_fast.runtime.errors import HscrError

__version__ = "0.1.0"
__all__ = ["HscrError"]
