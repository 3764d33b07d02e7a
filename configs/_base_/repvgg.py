# RepVGG backbones for the configs of this repository. A config inherits this
# file beside an mmseg or mmdet base and swaps the base's backbone with
# `backbone=dict(_base_.repvgg_<setting>, arch=..., init_cfg=...)`.
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

# Semantic segmentation at output stride 8, as mmseg's ResNet-d8 configs.
repvgg_d8 = dict(
    _delete_=True,
    type='RepVGG',
    out_indices=(0, 1, 2, 3),
    strides=(2, 2, 1, 1),
    dilations=(1, 1, 2, 4),
    norm_cfg=dict(type='SyncBN', requires_grad=True))

# Detection with FPN at output stride 32; frozen stem and first stage, and
# frozen norms, as mmdet's ResNets.
repvgg_fpn = dict(
    _delete_=True,
    type='RepVGG',
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=True)
