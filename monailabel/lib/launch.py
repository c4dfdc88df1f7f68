"""``monailabel start_server`` with the CORS origins it is given, and none other.

MONAI Label allows every web origin, with credentials, unless ``MONAI_LABEL_CORS_ORIGINS`` lists
some; tools/start_monailabel.sh always lists some. With pydantic 2 the setting holds ``AnyHttpUrl``
objects, which MONAI Label 0.8.5 cannot serialise (``start_server`` stops with "Object of type
AnyHttpUrl is not JSON serializable", and so does every training process it starts) and which print
with a trailing "/" that no browser sends (so no origin would ever match). This launcher turns them
into plain origin strings, refuses to start without any, keeps the setting out of the task processes'
environment (they serve no HTTP), then runs MONAI Label's own command line:

    python -m lib.launch start_server --app APP --studies STUDIES ...   (from the app folder)
"""

from __future__ import annotations

import os
import sys
from typing import Any

CORS_SETTING = "MONAI_LABEL_CORS_ORIGINS"


def plain_origins(origins: list) -> list[str]:
    """``AnyHttpUrl('http://127.0.0.1:8000')`` -> ``'http://127.0.0.1:8000'`` (the Origin header's form)."""
    return [str(origin).rstrip("/") for origin in origins]


def main() -> None:
    from monailabel.config import settings

    from monailabel.main import Main

    class Launcher(Main):
        def start_server_init_settings(self, args: Any) -> None:
            super().start_server_init_settings(args)  # exports every setting to os.environ
            os.environ.pop(CORS_SETTING, None)  # task processes would fail to log it (AnyHttpUrl)

    origins = plain_origins(list(settings.MONAI_LABEL_CORS_ORIGINS or []))
    if not origins or "*" in origins:
        sys.exit(
            f"{CORS_SETTING} lists no origin: MONAI Label would let every web page call the "
            "server; start it with tools/start_monailabel.sh (MONAILABEL_CORS_ORIGINS, "
            "docs/monailabel.md)"
        )
    settings.MONAI_LABEL_CORS_ORIGINS = origins  # plain strings: no validation on assignment
    Launcher().run()


if __name__ == "__main__":
    main()
