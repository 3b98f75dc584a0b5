"""Where the model store is: ``$IMAGE_CAPTIONING_HOME`` or ``pretrained_models/`` in the repository.

Its own small module (standard library only) so that start-up code (the compile cache, the command line's
map.json answers) can find the store without importing `utils.downloads` (tqdm, numpy, HTTP).

Example::

    from utils.store import home_dir
    home_dir() / "coco" / "outputs" / "map.json"
"""

import os
from pathlib import Path

HOME_ENV = "IMAGE_CAPTIONING_HOME"


def home_dir() -> Path:
    """The model store: ``$IMAGE_CAPTIONING_HOME`` or ``pretrained_models/`` in the repository."""
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "pretrained_models"
