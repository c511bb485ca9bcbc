# UPerNet, ADE20K 512x512, 160k iterations, AdamW lr 6e-5 / wd 0.01, poly decay after a 1500-iteration
# warm-up, batch 2 x 8 GPUs: mmseg's Swin config, which is the recipe every family's paper followed; the
# backbone is swapped for an attnzoo one (a variant file names it and the head widths).
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

custom_imports = dict(imports=['attnzoo.openmmlab'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnZooBackbone',
        model_name=None,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        out_norms=True))

no_decay = dict(decay_mult=0.)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'rpb': no_decay,
    'an_bias': no_decay, 'na_bias': no_decay, 'ah_bias': no_decay,
    'aw_bias': no_decay, 'ha_bias': no_decay, 'wa_bias': no_decay,
}))
