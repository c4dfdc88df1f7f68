"""MONAI Label app: annotate cryo-SXT tomograms, predict membranes, retrain semi-supervised.

Start it with ``tools/start_monailabel.sh STUDIES [PORT]`` (docs/monailabel.md). Options, given as
``--conf KEY VALUE`` to ``monailabel start_server``:

- ``bundle``: the source bundle (default: ``bundle/`` beside this app folder). The app serves and
  trains a working copy in ``<app>/model/<bundle name>``, never the online model zoo.
- ``reset_weights``: ``true`` replaces the working copy's weights with the bundle's shipped ones.
- ``extensions``: datastore file patterns, comma-separated (default ``*.mrc,*.rec,*.tif,*.tiff,
  *.nii.gz,*.nii``; NIfTI is where 3D Slicer saves labels).
- ``skip_trainers``: ``true`` serves inference only.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import version
from typing import Any

from fastapi import HTTPException
from lib.bundle_copy import bundle_name, prepare_working_bundle
from lib.datastore import TomogramDatastore, known_ids, parse_extensions
from lib.infer import TomogramSegmentation
from lib.train import SemiSupervisedTrain
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


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

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, with HTTP errors that say what is wrong instead of a bare 500."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; models: {sorted(self._infers)}")
        if not self._infers[model].is_valid():
            raise HTTPException(status_code=503, detail=f"model {model!r} has no weights yet: train it first "
                                "(POST /train) or upload weights (PUT /model)")
        image = request.get("image")
        store = datastore if datastore else self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and not store.get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore; "
                                f"known images: {known_ids(store.list_images())}")
        from scripts.io.volume import VolumeError
        from scripts.network.weights import WeightsError

        try:
            return super().infer(request, datastore)
        except VolumeError as err:
            raise HTTPException(status_code=422, detail=f"image {image!r} cannot be read: {err}") from err
        except WeightsError as err:
            raise HTTPException(status_code=503, detail=f"model {model!r}: {err}") from err
