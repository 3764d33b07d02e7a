"""INT8 of exported segmentors, above :mod:`mmrepvgg.deploy`: it imports
the deploy modules, and nothing below imports it.

One module per concept:

- :mod:`.agreement`: how an int8 model's labels agree with its reference's;
- :mod:`.ptq`: calibrated post-training int8 of an fp32 export, equalized
  (:mod:`mmrepvgg.models.equalization`) when full int8 misses the agreement
  asked;
- :mod:`.mixed_precision`: each conv's int8 sensitivity, and the convs kept
  in fp32;
- :mod:`.fake_quant`: fake-quantized modules and the model prepared for
  QAT;
- :mod:`.calibration`: QAT's first activation ranges, and their average
  across processes;
- :mod:`.training`: QAT with the mmengine Runner (config, model,
  distillation, hook, runner);
- :mod:`.qat_export`: a QAT checkpoint's int8 ONNX model, checked.
"""
