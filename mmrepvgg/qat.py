"""The QAT Runner and hook under the name that configs written before
:mod:`mmrepvgg.quantization` import (``custom_imports``)."""
from .quantization.training import QATHook, QATRunner  # noqa: F401
