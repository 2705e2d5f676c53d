"""factedit: knowledge editing for Hugging Face causal language models.

    import factedit as fe
    model = fe.load_model("smollm2-135m")
    req = fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                         target_new="Rome", target_true="Paris")
    handle = fe.edit(model, [req], method="rome")
    fe.evaluate(model, [req])
"""

from ._version import __version__ as __version__  # noqa: E402
from .methods import list_methods  # noqa: E402
from .metrics import Baseline, GenerationOptions, capture_baseline, evaluate  # noqa: E402
from .models import EditableModel, load_model  # noqa: E402
from .patch import Patch, PatchError  # noqa: E402
from .protocol import EditHandle, edit  # noqa: E402
from .protocol.sequence import SequenceReport, run_sequence  # noqa: E402
from .requests import EditRequest, InvalidRequestError  # noqa: E402

__all__ = [
    "Baseline", "EditHandle", "EditRequest", "GenerationOptions", "EditableModel", "InvalidRequestError", "Patch",
    "PatchError", "SequenceReport", "capture_baseline", "edit", "evaluate", "list_methods", "load_model",
    "run_sequence",
]
