"""``quantize --calibrate [TEXT_FILE]``: quantization calibrated on activations (GPTQ), layer by layer.

- ``text``: the calibration text (built-in public-domain prose, or the user's file, checked) and its tokens;
- ``capture``: recorders that collect what each linear layer (and each routed expert) reads;
- ``gptq``: error-compensating rounding of one matrix into MLX's affine format;
- ``layerwise``: the conversion itself, one decoder layer at a time, writing into the planned shards.
"""

from .layerwise import MIN_EXPERT_TOKENS, Calibration, CalibrationInput, calibration_input, convert_calibrated
from .text import CalibrationText, read_text

__all__ = ["MIN_EXPERT_TOKENS", "Calibration", "CalibrationInput", "CalibrationText", "calibration_input",
           "convert_calibrated", "read_text"]
