# Fine-tuning on the pasted Fashion-MNIST detection set (tools/make_dense_demo_data.py writes it under
# data/fashion_dense/det/; tools/finetune.py runs the whole path): data, image size and a short schedule, kept in
# one dict, `fashion_det`, that a fine-tune config applies over its family's 1x config (mmengine refuses two
# bases that set one key, so this file sets no other; see configs/mmdet/finetune/). Of the model it changes only
# what comes with the data: the class count and the input normalisation.


def _fashion_det():
    classes = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
    data_root = 'data/fashion_dense/det/'
    height, width = 160, 192  # the canvases make_dense_demo_data.py writes by default
    max_epochs = 4

    load = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='Resize', scale=(width, height), keep_ratio=True)]
    train_pipeline = load + [dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]
    test_pipeline = load + [
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]

    def dataset(split, train):
        pipeline = train_pipeline if train else test_pipeline
        return dict(type='CocoDataset', data_root=data_root, ann_file=f'annotations/instances_{split}.json',
                    data_prefix=dict(img=f'images/{split}/'), metainfo=dict(classes=classes),
                    filter_cfg=dict(filter_empty_gt=train, min_size=0), test_mode=not train, pipeline=pipeline)

    return dict(
        model=dict(
            # Fashion-MNIST's mean/std (0.2860, 0.3530), as tools/train.py normalised the classification
            # pretraining, on each channel of the grey canvases
            data_preprocessor=dict(mean=[72.93] * 3, std=[90.02] * 3),
            roi_head=dict(bbox_head=dict(num_classes=len(classes)), mask_head=dict(num_classes=len(classes)))),
        data_root=data_root,
        max_epochs=max_epochs,
        train_pipeline=train_pipeline,
        test_pipeline=test_pipeline,
        train_dataloader=dict(batch_size=8, num_workers=4, dataset=dataset('train', True)),
        val_dataloader=dict(batch_size=8, num_workers=4, dataset=dataset('val', False)),
        val_evaluator=dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox', 'segm']),
        # 8 images a batch on one GPU; the family's AdamW after a 50-iteration warm-up, cosine to 1% by the last
        # epoch; evaluated every epoch (the mAP curve, stepped by iteration like the loss), one checkpoint at the end
        train_cfg=dict(max_epochs=max_epochs, val_interval=1),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
            dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs,
                 eta_min_ratio=0.01, convert_to_iter_based=True),
        ],
        default_hooks=dict(logger=dict(interval=10, log_metric_by_epoch=False),
                           checkpoint=dict(interval=max_epochs, max_keep_ckpts=1)),
        log_processor=dict(window_size=10),
        # the family's AdamW at 2e-4 instead of its 1e-4 (COCO's 1x rate): from the checkpoint, bbox mAP >= 0.5 for
        # all three shipped models and above scratch (benchmarks/results/finetune_det_lr.md; at 1e-4 nat_tiny
        # reached 0.488); merged into the family's optim_wrapper, so only lr changes
        optim_wrapper=dict(optimizer=dict(lr=2e-4)),
    )


fashion_det = _fashion_det()
