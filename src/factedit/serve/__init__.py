"""`factedit serve`: one model that answers OpenAI-style requests while it takes edits.

    from factedit.serve import EditService, ServeSettings, Auth, create_app
    service = EditService(ServeSettings(method="d4s", state_dir="state"))
    app = create_app(service, Auth({"secret-token-...": "me"}))   # run it with uvicorn

`engine` holds the model copies, the editor worker and the readers-writer lock, `ledger` the
SQLite ledger, `store` the state generations on disk and the crash-consistency order, `app`
the HTTP API. docs/serve.md describes them for users.
"""

from .app import ApiError, Auth, create_app
from .engine import EditService, RWLock, ServeSettings, removal_refusal
from .ledger import Ledger, LedgerRow
from .store import StateMismatchError, StateStore

__all__ = ["ApiError", "Auth", "EditService", "Ledger", "LedgerRow", "RWLock", "ServeSettings",
           "StateMismatchError", "StateStore", "create_app", "removal_refusal"]
