"""MONAI Label app: annotate cryo-SXT tomograms, predict membranes, retrain semi-supervised.

Start it with ``tools/start_monailabel.sh STUDIES [PORT]`` (docs/monailabel.md). Options, given as
``--conf KEY VALUE`` to ``monailabel start_server``:

- ``bundle``: the source bundle (default: ``bundle/`` beside this app folder). The app serves and
  trains a working copy in ``<app>/model/<bundle name>``, never the online model zoo.
- ``reset_weights``: ``true`` replaces the working copy's weights with the bundle's shipped ones.
- ``extensions``: datastore file patterns, comma-separated (default ``*.mrc,*.rec,*.tif,*.tiff,
  *.nii.gz,*.nii``; NIfTI is where 3D Slicer saves labels).
- ``skip_trainers``: ``true`` serves inference only.

Requests are data, never code or paths: /infer and /train options are parsed to typed values
(``lib/request_options``) before MONAI Label or the bundle sees them, images are datastore ids, and
the datastore keeps every file inside the studies folder (``lib/datastore``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
from importlib.metadata import version
from typing import Any

from fastapi import HTTPException
from lib.bundle_copy import bundle_name, prepare_working_bundle
from lib.datastore import TomogramDatastore, known_ids, parse_extensions
from lib.errors import find_cause
from lib.infer import TomogramSegmentation
from lib.request_options import INFER_IGNORED, OptionError, parse_options
from lib.safe_paths import UnsafePathError, check_plain_name, inside
from lib.train import SemiSupervisedTrain
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.others.generic import strtobool
from monailabel.utils.sessions import Sessions

logger = logging.getLogger(__name__)

# Keys MONAI Label's /infer endpoint itself puts in the request (beside the client's options).
INFER_ENDPOINT_KEYS = ("model", "image", "session")

# PUT /session?uncompress=true unpacks a client's archive with shutil.unpack_archive: without a filter
# a tar member named ../x or /x lands outside the sessions folder. The "data" filter refuses those.
tarfile.TarFile.extraction_filter = staticmethod(tarfile.data_filter)


class CheckedSessions(Sessions):
    """MONAI Label's sessions (a volume 3D Slicer uploads to segment without adding it to the
    datastore), with a refused archive answered as HTTP 400 instead of a bare 500."""

    def add_session(
        self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: str | None = None
    ) -> Any:
        try:
            return super().add_session(data_file, expiry, uncompress, session_id)
        except (tarfile.TarError, shutil.ReadError) as err:
            raise HTTPException(status_code=400, detail=f"session archive refused: {err}") from None


class CryoSXTMembraneApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        source = conf.get("bundle") or os.path.join(os.path.dirname(os.path.realpath(app_dir)), "bundle")
        self.model_name = bundle_name(source)
        # Parsed before the bundle (and its scripts.options) is importable: the flag decides its copy.
        reset = strtobool(conf.get("reset_weights", "false"))
        self.working_bundle = str(prepare_working_bundle(source, os.path.join(app_dir, "model"), reset))
        # The bundle's Python package `scripts` (readers, network, predictor) for the tasks below.
        if self.working_bundle not in sys.path:
            sys.path.insert(0, self.working_bundle)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="cryo-SXT membrane segmentation",
            description="Membranes of cryo-soft X-ray tomograms, slice by slice, with the semi-supervised "
            "double-decoder network (Dyhr, Sadeghi et al., PNAS 2023)",
            version=version("monailabel"),
        )
        _check_background_requests(self)

    def _load_sessions(self, load: bool = False) -> Sessions | None:
        if not load:
            return None
        return CheckedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = parse_extensions(self.conf.get("extensions"))
        logger.info("datastore %s, extensions %s", self.studies, extensions)
        return TomogramDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, Any]:
        self.segmenter = TomogramSegmentation(self.working_bundle, self.conf)
        return {self.model_name: self.segmenter}

    def init_trainers(self) -> dict[str, Any]:
        from scripts.options import as_bool

        if as_bool(self.conf.get("skip_trainers", "false"), "skip_trainers"):
            return {}
        task = SemiSupervisedTrain(self.working_bundle, self.conf, inference_width=self.segmenter.width)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> dict[str, Any]:
        return {"first": First(), "random": Random()}

    # ------------------------------------------------------------------ requests

    def checked_train_options(
        self, request: dict[str, Any] | None, params: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(request, params) of a training request with the options parsed to their types; HTTP 404
        for an unknown trainer, 422 naming a bad option. Runs in the server before the task starts."""
        request = dict(request or {})
        model = request.pop("model", None)
        task = self._trainers.get(model) if isinstance(model, str) else None
        if task is None:
            raise HTTPException(status_code=404, detail=f"no trainer {model!r}; trainers: {sorted(self._trainers)}")
        options = {**request, **(params or {})}
        for name in self._trainers:  # the deprecated POST /train/ also nests the options per model
            if isinstance(options.get(name), dict):
                options.pop(name)
        try:
            typed = task.checked_request(options)
        except OptionError as err:
            raise HTTPException(status_code=422, detail=f"training not started: {err}") from None
        return {"model": model}, typed

    def _infer_image(self, request: dict[str, Any], store: Datastore) -> str:
        """The file to segment: a datastore image (by id), or the image of the request's MONAI Label
        session (a volume a client uploaded with PUT /session). Never a path from the request."""
        image = request.get("image")
        session = request.get("session")
        sessions = self.sessions()
        if isinstance(session, dict) and sessions is not None and image == session.get("image"):
            try:
                info = sessions.get_session(check_plain_name(session.get("name"), "session"), update_ts=False)
                if info is not None and info.image == image:
                    return str(inside(image, sessions.store_path, "session image"))
            except UnsafePathError as err:
                raise HTTPException(status_code=400, detail=str(err)) from None
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="no image: give a datastore id as ?image=ID")
        if any(c in image for c in ("/", "\\")) or image in (".", ".."):
            raise HTTPException(
                status_code=400,
                detail=f"image {image!r} is a path: /infer takes the id "
                "of a datastore image (add files with PUT /datastore/image); known images: "
                f"{known_ids(store.list_images())}",
            )
        uri = store.get_image_uri(image)  # 400 from the datastore for a name or file it refuses
        if not uri:
            raise HTTPException(
                status_code=404,
                detail=f"image {image!r} is not in the datastore; known images: {known_ids(store.list_images())}",
            )
        return uri

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer on a checked request, with HTTP errors that say what is wrong."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; models: {sorted(self._infers)}")
        task = self._infers[model]
        if not task.is_valid():
            raise HTTPException(
                status_code=503,
                detail=f"model {model!r} has no weights yet: train it first "
                "(POST /train) or upload weights (PUT /model)",
            )
        store = datastore if datastore else self.datastore()
        options = {k: v for k, v in request.items() if k not in INFER_ENDPOINT_KEYS}
        try:
            typed = parse_options(options, task.option_schema(), INFER_IGNORED)
        except OptionError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        image = request.get("image")
        # An absolute path: MONAI Label's infer reads it as it is and saves no label from it.
        checked = {"model": model, "image": self._infer_image(request, store), **typed}
        from scripts.io.volume import VolumeError
        from scripts.network.weights import WeightsError

        try:
            return super().infer(checked, store)
        except HTTPException:
            raise
        except Exception as err:  # MONAI wraps the bundle's errors in "Failed to evaluate ConfigExpression"
            cause = find_cause(err, (HTTPException, VolumeError, WeightsError))
            if isinstance(cause, HTTPException):
                raise cause from err
            if isinstance(cause, WeightsError):  # first: the served weights, not the image, are at fault
                raise HTTPException(status_code=503, detail=f"model {model!r}: {cause}") from err
            if isinstance(cause, VolumeError):
                detail = f"image {image!r} cannot be read: {cause}"
                raise HTTPException(status_code=422, detail=detail) from err
            raise

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        # MONAI Label would tile .tif studies as slides and call the task directly, past infer's checks.
        raise HTTPException(status_code=400, detail="this app segments whole tomograms: use POST /infer/{model}")

    def batch_infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        raise HTTPException(status_code=400, detail=BATCH_REFUSED)


BATCH_REFUSED = (
    "batch inference is not offered by this app: run POST /infer per image, or the bundle's "
    "inference runner (docs/inference.md) for a folder"
)


def _check_background_requests(app: CryoSXTMembraneApp) -> None:
    """Parse training options in the server, before MONAI Label starts the training process.

    MONAI Label answers POST /train with 200 and hands the raw request to a new process; a bad option
    would only fail there, after the client was told the run started. Its endpoints all go through
    ``AsyncTask.run``, so the check wraps that (once per process): a bad request gets its 4xx here.
    """
    stock = AsyncTask.run
    if getattr(stock, "cryosxt_checked", False):
        return

    def run(
        method: str,
        request: dict | None = None,
        params: dict | None = None,
        force_sync: bool = False,
        enqueue: bool = False,
    ) -> Any:
        if method == "batch_infer":
            raise HTTPException(status_code=400, detail=BATCH_REFUSED)
        if method == "train":
            request, params = app.checked_train_options(request, params)
        return stock(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run.cryosxt_checked = True  # type: ignore[attr-defined]
    AsyncTask.run = staticmethod(run)  # type: ignore[method-assign]
