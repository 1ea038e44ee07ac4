"""raylab: fine-tune large language models on your own data with Ray.

    raylab validate configs/quickstart.yaml
    raylab doctor configs/quickstart.yaml

Python API: ``raylab.load_config(path, overrides)``; each stage adds its function here.
"""

from raylab.config import RaylabConfig
from raylab.config import load as load_config
from raylab.errors import ConfigError, UserError

__version__ = "0.1.0"
__all__ = ["RaylabConfig", "load_config", "UserError", "ConfigError", "__version__"]
