"""factedit: knowledge editing for Hugging Face causal language models."""

__version__ = "0.1.0"

from .models import EditableModel, load_model  # noqa: E402
from .requests import EditRequest, InvalidRequestError  # noqa: E402
