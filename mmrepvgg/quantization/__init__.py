"""INT8 of exported segmentors, above :mod:`mmrepvgg.deploy`: it imports
the deploy modules, and nothing below imports it. One module per concept
(listed in ``docs/design/layout.md``): calibrated post-training int8
(:mod:`.ptq`) and quantization-aware training (:mod:`.training`), whose
checkpoints :mod:`.qat_export` exports.
"""
